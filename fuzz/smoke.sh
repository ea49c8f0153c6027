#!/usr/bin/env bash
# Fuzz smoke for CI: each coverage-guided target (see fuzz/README.md) runs
# for a few seconds over the corpus kept in the repo. New inputs go to a
# temporary directory, never into fuzz/corpus. A crash fails the run and
# leaves the input in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
SECONDS_PER_TARGET="${FUZZ_SMOKE_SECONDS:-15}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for target in codec session; do
  mkdir -p "$tmp/$target"
  # -s none: no sanitizer, so the stable toolchain builds it (the code is
  # forbid(unsafe_code); the checks are the targets' own assertions).
  cargo fuzz run -s none -O "$target" "$tmp/$target" "corpus/$target" -- \
    -max_total_time="$SECONDS_PER_TARGET" -max_len=4096
done
