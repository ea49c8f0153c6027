#!/usr/bin/env python3
"""Offline check of the links in README.md and docs/*.md (run by .ci/run).

- A relative link must name a file or directory of the repository.
- A `#fragment` (on a link to a Markdown file, or alone for the same file)
  must be a heading's anchor as GitHub makes it, or an explicit
  `<a id="...">` / `<a name="...">`.
- A code block preceded by `<!-- snippet: PATH -->` must appear verbatim in
  PATH, so a README excerpt cannot drift from the file the tests run.

Links to http(s) and mailto are not followed (no network). Exits 1 and
lists every problem as FILE:LINE: message.
"""

import re
import sys
import unicodedata
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")
SNIPPET = re.compile(r"^<!--\s*snippet:\s*(\S+)\s*-->\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: keep the text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in "-_" or cat[0] in "LN" or cat == "Mn":
            out.append(ch)
        elif ch == " ":
            out.append("-")
    return "".join(out)


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    in_fence = False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            yield n, line


def anchors(path: Path, cache: dict) -> set:
    if path not in cache:
        found, counts = set(), {}
        for _, line in prose_lines(path.read_text(encoding="utf-8")):
            m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
            if m:
                base = slug(m.group(1))
                n = counts.get(base, 0)
                counts[base] = n + 1
                found.add(base if n == 0 else f"{base}-{n}")
            found.update(HTML_ANCHOR.findall(line))
        cache[path] = found
    return cache[path]


def check_snippets(md: Path, text: str, problems: list) -> None:
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = SNIPPET.match(line)
        if not m:
            continue
        source = (md.parent / m.group(1)).resolve()
        rel = md.relative_to(ROOT)
        if i + 1 >= len(lines) or not FENCE.match(lines[i + 1]):
            problems.append(f"{rel}:{i + 1}: snippet marker not followed by a code block")
            continue
        end = next((j for j in range(i + 2, len(lines)) if FENCE.match(lines[j])), None)
        if end is None:
            problems.append(f"{rel}:{i + 2}: unterminated code block")
            continue
        if not source.is_file():
            problems.append(f"{rel}:{i + 1}: snippet source {m.group(1)} does not exist")
            continue
        block = "\n".join(lines[i + 2 : end]) + "\n"
        if block not in source.read_text(encoding="utf-8"):
            problems.append(
                f"{rel}:{i + 2}: this code block is not a verbatim excerpt of {m.group(1)}"
            )


def main() -> int:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
    cache: dict = {}
    problems: list = []
    links = 0
    for md in files:
        text = md.read_text(encoding="utf-8")
        rel = md.relative_to(ROOT)
        check_snippets(md, text, problems)
        for n, line in prose_lines(text):
            line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
            targets = [m.group(1) for m in INLINE.finditer(line)]
            ref = REFERENCE.match(line)
            if ref:
                targets.append(ref.group(1))
            for target in targets:
                if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                    continue  # http:, https:, mailto: ...
                links += 1
                path_part, _, fragment = target.partition("#")
                dest = (md.parent / unquote(path_part)).resolve() if path_part else md
                if path_part and not (dest == ROOT or ROOT in dest.parents):
                    problems.append(f"{rel}:{n}: {target}: points outside the repository")
                    continue
                if not dest.exists():
                    problems.append(f"{rel}:{n}: {target}: no such file or directory")
                    continue
                if fragment:
                    if dest.suffix != ".md" or dest.is_dir():
                        problems.append(f"{rel}:{n}: {target}: anchor on a non-Markdown target")
                    elif unquote(fragment) not in anchors(dest, cache):
                        problems.append(f"{rel}:{n}: {target}: no heading with anchor #{fragment}")
    for p in problems:
        print(p)
    print(
        f"check-links: {len(files)} files, {links} relative links, "
        f"{len(problems)} problem(s)",
        file=sys.stderr,
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
