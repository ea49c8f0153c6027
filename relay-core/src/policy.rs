//! Authorization rules: may this principal SEND to / SUBSCRIBE to this
//! destination?
//!
//! A [`Policy`] is an ordered list of [`Rule`]s and a default [`Effect`]. The
//! first rule whose commands and destination pattern match decides; when
//! none matches, the default decides. This is the configurable part of
//! authorization; the protections that are always on (the gateway's own
//! exchanges, identity headers, `user.client_send_enabled`) live in
//! [`crate::router`], which consults the policy last.
//!
//! Destination patterns split on `/`: `*` matches within one segment,
//! `**` (a whole segment) matches any number of segments, `{name}` captures a
//! non-empty part of one segment for use in conditions
//! (`/exchange/chat/room.{id}`). Conditions: `authenticated`,
//! `user_equals`, `claim_equals`, `claim_contains`, and `all` / `any` of
//! conditions; their values are templates in which `{name}` is a capture.

use crate::frame::Command;
use serde_json::Value;
use std::fmt;

/// What a rule or the default does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Effect {
    #[default]
    Allow,
    Deny,
}

impl Effect {
    /// Parses `allow` or `deny`.
    pub fn parse(s: &str) -> Option<Effect> {
        match s {
            "allow" => Some(Effect::Allow),
            "deny" => Some(Effect::Deny),
            _ => None,
        }
    }
}

/// Who is asking: the authenticated user (if any) and the claims of its
/// token (an empty object when there is none).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Principal {
    pub user: Option<String>,
    pub claims: serde_json::Map<String, Value>,
}

impl Principal {
    /// An authenticated user without claims.
    pub fn user(name: impl Into<String>) -> Principal {
        Principal {
            user: Some(name.into()),
            claims: serde_json::Map::new(),
        }
    }

    /// The value of `claim`: the key itself if present, else a dotted path
    /// into nested objects (`realm_access.roles`).
    pub fn claim(&self, claim: &str) -> Option<&Value> {
        if let Some(v) = self.claims.get(claim) {
            return Some(v);
        }
        let mut parts = claim.split('.');
        let first = self.claims.get(parts.next()?)?;
        parts.try_fold(first, |v, p| v.get(p))
    }
}

/// A rule that cannot be compiled; `field` is the rule's key it is about
/// (`commands`, `destination`, `allow_if`, ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct RuleError {
    pub field: &'static str,
    pub reason: String,
}

fn rule_error(field: &'static str, reason: impl Into<String>) -> RuleError {
    RuleError {
        field,
        reason: reason.into(),
    }
}

/// What a matching rule decides.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Allow,
    Deny,
    /// Allow when the condition holds, deny otherwise (no fall-through).
    AllowIf(Condition),
}

/// A condition on the principal and the captures of the destination.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// The client authenticated (a JWT was verified).
    Authenticated,
    /// The user name equals the value.
    UserEquals(Template),
    /// The claim (a string, number or boolean) equals the value.
    ClaimEquals { claim: String, value: Template },
    /// The claim is an array with an element equal to the value, or a
    /// string whose space-separated words include it (OAuth `scope`).
    ClaimContains { claim: String, value: Template },
    /// Every condition holds.
    All(Vec<Condition>),
    /// At least one condition holds.
    Any(Vec<Condition>),
}

/// A value with `{name}` placeholders filled from the captures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Part>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Capture(String),
}

impl Template {
    fn parse(s: &str, captures: &[String]) -> Result<Template, String> {
        let parts = split_placeholders(s)?;
        for p in &parts {
            if let Part::Capture(name) = p {
                if !captures.contains(name) {
                    return Err(format!(
                        "{{{name}}} is not a capture of the destination pattern"
                    ));
                }
            }
        }
        Ok(Template(parts))
    }

    fn render(&self, caps: &Captures) -> String {
        self.0
            .iter()
            .map(|p| match p {
                Part::Lit(s) => s.as_str(),
                Part::Capture(n) => caps.get(n).unwrap_or_default(),
            })
            .collect()
    }
}

/// Splits `a{b}c` into literal and placeholder parts; a brace that does not
/// form `{name}` is an error.
fn split_placeholders(s: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        match rest.find(['{', '}']) {
            None => {
                parts.push(Part::Lit(rest.to_owned()));
                break;
            }
            Some(i) => {
                if i > 0 {
                    parts.push(Part::Lit(rest[..i].to_owned()));
                }
                if rest[i..].starts_with('}') {
                    return Err(format!("unmatched '}}' in {s:?}"));
                }
                let Some(end) = rest[i..].find('}') else {
                    return Err(format!("unmatched '{{' in {s:?}"));
                };
                let name = &rest[i + 1..i + end];
                let valid = name
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    return Err(format!(
                        "{{{name}}} in {s:?} is not a capture name (letters, digits, _)"
                    ));
                }
                parts.push(Part::Capture(name.to_owned()));
                rest = &rest[i + end + 1..];
            }
        }
    }
    Ok(parts)
}

/// One piece of a pattern segment.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Lit(String),
    /// `*`: any characters of the segment, possibly none.
    Star,
    /// `{name}`: a non-empty run of the segment's characters.
    Capture(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// `**`: any number of whole segments, possibly none.
    Any,
    Glob(Vec<Piece>),
}

/// A destination pattern (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    segments: Vec<Segment>,
    captures: Vec<String>,
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Captured segment parts, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captures(Vec<(String, String)>);

impl Captures {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Pattern {
    /// Compiles a pattern; it must start with `/`.
    pub fn parse(text: &str) -> Result<Pattern, String> {
        if !text.starts_with('/') {
            return Err(format!("pattern {text:?} must start with '/'"));
        }
        let mut captures: Vec<String> = Vec::new();
        let mut segments = Vec::new();
        for seg in text.split('/') {
            if seg == "**" {
                segments.push(Segment::Any);
                continue;
            }
            if seg.contains("**") {
                return Err(format!(
                    "pattern {text:?}: '**' must be a whole segment (between two '/')"
                ));
            }
            let mut pieces = Vec::new();
            for part in split_placeholders(seg).map_err(|e| format!("pattern {e}"))? {
                match part {
                    Part::Capture(name) => {
                        if captures.contains(&name) {
                            return Err(format!("pattern {text:?} captures {{{name}}} twice"));
                        }
                        captures.push(name.clone());
                        pieces.push(Piece::Capture(name));
                    }
                    Part::Lit(lit) => {
                        let mut first = true;
                        for chunk in lit.split('*') {
                            if !first {
                                pieces.push(Piece::Star);
                            }
                            first = false;
                            if !chunk.is_empty() {
                                pieces.push(Piece::Lit(chunk.to_owned()));
                            }
                        }
                    }
                }
            }
            let adjacent_wildcards = pieces
                .windows(2)
                .any(|w| !matches!(w[0], Piece::Lit(_)) && !matches!(w[1], Piece::Lit(_)));
            if adjacent_wildcards {
                return Err(format!(
                    "pattern {text:?}: segment {seg:?} has two wildcards or captures with nothing between them"
                ));
            }
            segments.push(Segment::Glob(pieces));
        }
        Ok(Pattern {
            text: text.to_owned(),
            segments,
            captures,
        })
    }

    /// The capture names, in order.
    pub fn capture_names(&self) -> &[String] {
        &self.captures
    }

    /// Matches `destination`, returning the captures.
    pub fn matches(&self, destination: &str) -> Option<Captures> {
        let segs: Vec<&str> = destination.split('/').collect();
        let mut caps = Captures::default();
        match_segments(&self.segments, &segs, &mut caps).then_some(caps)
    }
}

fn match_segments(pattern: &[Segment], segs: &[&str], caps: &mut Captures) -> bool {
    let Some((first, rest)) = pattern.split_first() else {
        return segs.is_empty();
    };
    match first {
        Segment::Any => (0..=segs.len()).any(|skip| {
            let mark = caps.0.len();
            let ok = match_segments(rest, &segs[skip..], caps);
            if !ok {
                caps.0.truncate(mark);
            }
            ok
        }),
        Segment::Glob(pieces) => {
            let Some((seg, segs_rest)) = segs.split_first() else {
                return false;
            };
            let mark = caps.0.len();
            if match_pieces(pieces, seg, caps) && match_segments(rest, segs_rest, caps) {
                return true;
            }
            caps.0.truncate(mark);
            false
        }
    }
}

fn match_pieces(pieces: &[Piece], text: &str, caps: &mut Captures) -> bool {
    let Some((first, rest)) = pieces.split_first() else {
        return text.is_empty();
    };
    match first {
        Piece::Lit(lit) => text
            .strip_prefix(lit.as_str())
            .is_some_and(|t| match_pieces(rest, t, caps)),
        Piece::Star | Piece::Capture(_) => {
            let min = usize::from(matches!(first, Piece::Capture(_)));
            for (i, _) in text.char_indices().chain([(text.len(), ' ')]) {
                if i < min {
                    continue;
                }
                let mark = caps.0.len();
                if let Piece::Capture(name) = first {
                    caps.0.push((name.clone(), text[..i].to_owned()));
                }
                if match_pieces(rest, &text[i..], caps) {
                    return true;
                }
                caps.0.truncate(mark);
            }
            false
        }
    }
}

impl Condition {
    /// Compiles a condition from its configuration form: the string
    /// `"authenticated"`, or a table with one key: `user_equals = "{user}"`,
    /// `claim_equals = { claim, value }`, `claim_contains = { claim, value }`,
    /// `all = [...]`, `any = [...]`. Captures must exist in `captures`.
    pub fn from_json(v: &Value, captures: &[String]) -> Result<Condition, String> {
        const KNOWN: &str =
            "\"authenticated\", user_equals, claim_equals, claim_contains, all, any";
        match v {
            Value::String(s) if s == "authenticated" => Ok(Condition::Authenticated),
            Value::String(s) => Err(format!(
                "unknown condition {s:?} (expected one of: {KNOWN})"
            )),
            Value::Object(map) if map.len() == 1 => {
                let Some((key, value)) = map.iter().next() else {
                    return Err("empty condition".into());
                };
                match key.as_str() {
                    "user_equals" => {
                        let Value::String(s) = value else {
                            return Err("user_equals takes a string".into());
                        };
                        Ok(Condition::UserEquals(Template::parse(s, captures)?))
                    }
                    "claim_equals" | "claim_contains" => {
                        let (claim, value) = claim_spec(key, value, captures)?;
                        Ok(if key == "claim_equals" {
                            Condition::ClaimEquals { claim, value }
                        } else {
                            Condition::ClaimContains { claim, value }
                        })
                    }
                    "all" | "any" => {
                        let Value::Array(items) = value else {
                            return Err(format!("{key} takes a list of conditions"));
                        };
                        if items.is_empty() {
                            return Err(format!("{key} needs at least one condition"));
                        }
                        let list = items
                            .iter()
                            .map(|i| Condition::from_json(i, captures))
                            .collect::<Result<Vec<_>, _>>()?;
                        Ok(if key == "all" {
                            Condition::All(list)
                        } else {
                            Condition::Any(list)
                        })
                    }
                    other => Err(format!(
                        "unknown condition {other:?} (expected one of: {KNOWN})"
                    )),
                }
            }
            _ => Err(format!(
                "a condition is \"authenticated\" or a table with exactly one of: {KNOWN}"
            )),
        }
    }

    fn holds(&self, who: &Principal, caps: &Captures) -> bool {
        match self {
            Condition::Authenticated => who.user.is_some(),
            Condition::UserEquals(t) => who.user.as_deref() == Some(t.render(caps).as_str()),
            Condition::ClaimEquals { claim, value } => who
                .claim(claim)
                .is_some_and(|c| scalar_eq(c, &value.render(caps))),
            Condition::ClaimContains { claim, value } => {
                let want = value.render(caps);
                match who.claim(claim) {
                    Some(Value::Array(items)) => items.iter().any(|i| scalar_eq(i, &want)),
                    Some(Value::String(s)) => s.split(' ').any(|w| w == want),
                    _ => false,
                }
            }
            Condition::All(list) => list.iter().all(|c| c.holds(who, caps)),
            Condition::Any(list) => list.iter().any(|c| c.holds(who, caps)),
        }
    }
}

fn claim_spec(key: &str, v: &Value, captures: &[String]) -> Result<(String, Template), String> {
    let Value::Object(map) = v else {
        return Err(format!(
            "{key} takes a table {{ claim = \"...\", value = \"...\" }}"
        ));
    };
    if let Some(unknown) = map.keys().find(|k| *k != "claim" && *k != "value") {
        return Err(format!(
            "{key}: unknown key {unknown:?} (expected claim, value)"
        ));
    }
    let claim = match map.get("claim") {
        Some(Value::String(c)) if !c.is_empty() => c.clone(),
        _ => return Err(format!("{key}: claim must be a non-empty string")),
    };
    let value = match map.get("value") {
        Some(Value::String(s)) => Template::parse(s, captures)?,
        Some(Value::Number(n)) => Template(vec![Part::Lit(n.to_string())]),
        Some(Value::Bool(b)) => Template(vec![Part::Lit(b.to_string())]),
        _ => return Err(format!("{key}: value must be a string")),
    };
    Ok((claim, value))
}

/// A claim scalar compared with a string: strings as they are, numbers and
/// booleans by their JSON text.
fn scalar_eq(v: &Value, want: &str) -> bool {
    match v {
        Value::String(s) => s == want,
        Value::Number(n) => n.to_string() == want,
        Value::Bool(b) => b.to_string() == want,
        _ => false,
    }
}

/// The commands a rule can name.
pub const RULE_COMMANDS: [Command; 2] = [Command::Send, Command::Subscribe];

/// One rule: which commands, which destinations, what it decides.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    commands: Vec<Command>,
    pattern: Pattern,
    action: Action,
}

impl Rule {
    /// Compiles a rule from its configuration form: `commands` (empty means
    /// SEND and SUBSCRIBE), a destination pattern, and exactly one of
    /// `allow = true`, `deny = true` or an `allow_if` condition.
    pub fn new(
        commands: &[String],
        destination: &str,
        allow: bool,
        deny: bool,
        allow_if: Option<&Value>,
    ) -> Result<Rule, RuleError> {
        let mut parsed = Vec::new();
        for c in commands {
            let cmd = Command::parse(c.trim().to_ascii_uppercase().as_bytes())
                .filter(|c| RULE_COMMANDS.contains(c))
                .ok_or_else(|| {
                    rule_error(
                        "commands",
                        format!("unknown command {c:?} (expected SEND or SUBSCRIBE)"),
                    )
                })?;
            parsed.push(cmd);
        }
        let pattern = Pattern::parse(destination).map_err(|e| rule_error("destination", e))?;
        let action = match (allow, deny, allow_if) {
            (true, false, None) => Action::Allow,
            (false, true, None) => Action::Deny,
            (false, false, Some(c)) => Action::AllowIf(
                Condition::from_json(c, pattern.capture_names())
                    .map_err(|e| rule_error("allow_if", e))?,
            ),
            (false, false, None) => {
                return Err(rule_error(
                    "allow_if",
                    "a rule needs one of allow = true, deny = true or allow_if",
                ))
            }
            _ => {
                return Err(rule_error(
                    "allow_if",
                    "a rule takes only one of allow = true, deny = true or allow_if",
                ))
            }
        };
        Ok(Rule {
            commands: parsed,
            pattern,
            action,
        })
    }

    /// The destination pattern.
    pub fn pattern(&self) -> &Pattern {
        &self.pattern
    }

    fn applies(&self, command: Command, destination: &str) -> Option<Captures> {
        if !self.commands.is_empty() && !self.commands.contains(&command) {
            return None;
        }
        self.pattern.matches(destination)
    }
}

/// What the policy decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Denied by the rule at this index (`auth.rules[i]`).
    DeniedByRule(usize),
    /// No rule matched and the default is `deny`.
    DeniedByDefault,
}

/// Rules in order, then the default.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Policy {
    default: Effect,
    rules: Vec<Rule>,
}

impl Policy {
    pub fn new(default: Effect, rules: Vec<Rule>) -> Policy {
        Policy { default, rules }
    }

    /// Allows everything (Spring's relay behaviour).
    pub fn allow_all() -> Policy {
        Policy::default()
    }

    /// The first matching rule decides; else the default.
    pub fn check(&self, who: &Principal, command: Command, destination: &str) -> Verdict {
        for (i, rule) in self.rules.iter().enumerate() {
            let Some(caps) = rule.applies(command, destination) else {
                continue;
            };
            let allowed = match &rule.action {
                Action::Allow => true,
                Action::Deny => false,
                Action::AllowIf(c) => c.holds(who, &caps),
            };
            return if allowed {
                Verdict::Allow
            } else {
                Verdict::DeniedByRule(i)
            };
        }
        match self.default {
            Effect::Allow => Verdict::Allow,
            Effect::Deny => Verdict::DeniedByDefault,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn patterns_match_and_capture() {
        // (pattern, destination, expected captures or None for no match)
        type Case<'a> = (&'a str, &'a str, Option<&'a [(&'a str, &'a str)]>);
        let table: &[Case] = &[
            ("/topic/a", "/topic/a", Some(&[])),
            ("/topic/a", "/topic/ab", None),
            ("/topic/*", "/topic/room.42", Some(&[])),
            ("/topic/*", "/topic/a/b", None),
            ("/topic/**", "/topic/a/b", Some(&[])),
            ("/topic/**", "/topic", Some(&[])),
            ("/**", "/anything/at/all", Some(&[])),
            ("/topic/room.*", "/topic/room.42", Some(&[])),
            ("/topic/room.*", "/topic/room.", Some(&[])),
            ("/topic/room.{id}", "/topic/room.", None),
            ("/topic/room.{id}", "/topic/room.42", Some(&[("id", "42")])),
            (
                "/topic/room.{id}",
                "/topic/room.42.x",
                Some(&[("id", "42.x")]),
            ),
            ("/topic/room.{id}", "/topic/room.42/x", None),
            (
                "/exchange/adme.exchange/room.{id}",
                "/exchange/adme.exchange/room.7",
                Some(&[("id", "7")]),
            ),
            (
                "/exchange/{x}/{user}.inbox",
                "/exchange/mail/alice.inbox",
                Some(&[("x", "mail"), ("user", "alice")]),
            ),
            ("/a/**/{last}", "/a/b/c/d", Some(&[("last", "d")])),
            ("/a/**/z", "/a/z", Some(&[])),
            ("/a/{p}-{q}", "/a/x-y-z", Some(&[("p", "x"), ("q", "y-z")])),
        ];
        for (pattern, dest, want) in table {
            let p = Pattern::parse(pattern).unwrap();
            let got = p.matches(dest);
            let want = want.map(|w| {
                Captures(
                    w.iter()
                        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
                        .collect(),
                )
            });
            assert_eq!(got, want, "{pattern} vs {dest}");
        }
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in [
            "topic/x",
            "/a/x**",
            "/a/{id",
            "/a/id}",
            "/a/{}",
            "/a/{1x}",
            "/a/{id}/{id}",
            "/a/{a}{b}",
            "/a/*{a}",
            "/a/**{a}",
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rules_are_validated_by_field() {
        let err = |c: &[&str], d: &str, allow: bool, deny: bool, cond: Option<Value>| {
            let c: Vec<String> = c.iter().map(|s| (*s).to_owned()).collect();
            Rule::new(&c, d, allow, deny, cond.as_ref()).unwrap_err()
        };
        assert_eq!(err(&["PUBLISH"], "/a", true, false, None).field, "commands");
        assert_eq!(err(&["ACK"], "/a", true, false, None).field, "commands");
        assert_eq!(err(&[], "a", true, false, None).field, "destination");
        let e = err(
            &[],
            "/a/{id}",
            false,
            false,
            Some(json!({"user_equals": "{who}"})),
        );
        assert_eq!(e.field, "allow_if");
        assert!(e.reason.contains("{who} is not a capture"), "{e}");
        let e = err(&[], "/a", false, false, Some(json!("admin")));
        assert!(e.reason.contains("unknown condition \"admin\""), "{e}");
        let e = err(&[], "/a", false, false, Some(json!({"role_is": "x"})));
        assert!(e.reason.contains("unknown condition \"role_is\""), "{e}");
        let e = err(
            &[],
            "/a",
            false,
            false,
            Some(json!({"claim_equals": {"claim": "r"}})),
        );
        assert!(e.reason.contains("value must be a string"), "{e}");
        let e = err(&[], "/a", true, true, None);
        assert!(e.reason.contains("only one of"), "{e}");
        let e = err(&[], "/a", false, false, None);
        assert!(e.reason.contains("needs one of"), "{e}");
        assert!(Rule::new(&["send".into()], "/a", true, false, None).is_ok());
    }
}
