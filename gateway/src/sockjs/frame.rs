//! SockJS framing: the frames the server sends (`o`, `h`, `a[...]`,
//! `c[code,"reason"]`), the JSON string escaping browsers need, and parsing
//! what clients send (a JSON array of strings, or one JSON string on the
//! WebSocket transport).

/// The open frame.
pub const OPEN: &str = "o";
/// The heart-beat frame.
pub const HEARTBEAT: &str = "h";

/// Why a client payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// Empty body (`Payload expected.`).
    #[error("Payload expected.")]
    Empty,
    /// Not a JSON string array (`Broken JSON encoding.`).
    #[error("Broken JSON encoding.")]
    Broken,
}

/// Whether `c` must go out as `\uXXXX`: control characters, and the ranges
/// browsers or proxies mangle (U+200C-200F, U+2028-202F, U+2060-206F,
/// U+FFF0-FFFF) — what the SockJS protocol's `escapable_by_server` lists —
/// plus DEL and the C1 controls.
fn must_escape(c: char) -> bool {
    matches!(c as u32,
        0x00..=0x1f | 0x7f..=0x9f | 0x200c..=0x200f | 0x2028..=0x202f | 0x2060..=0x206f | 0xfff0..=0xffff)
}

/// Appends `s` as a JSON string literal, with SockJS's extra escaping.
pub fn push_json_string(out: &mut String, s: &str) {
    use std::fmt::Write as _;
    out.reserve(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if must_escape(c) => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `s` as a JSON string literal.
pub fn json_string(s: &str) -> String {
    let mut out = String::new();
    push_json_string(&mut out, s);
    out
}

/// The message frame `a[...]` for `messages`.
pub fn messages<S: AsRef<str>>(messages: &[S]) -> String {
    let len: usize = messages.iter().map(|m| m.as_ref().len() + 3).sum();
    let mut out = String::with_capacity(len + 3);
    out.push_str("a[");
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_string(&mut out, m.as_ref());
    }
    out.push(']');
    out
}

/// The close frame `c[code,"reason"]`.
pub fn close(code: u16, reason: &str) -> String {
    format!("c[{code},{}]", json_string(reason))
}

/// Parses an `xhr_send` / `jsonp_send` body: a JSON array of strings.
pub fn parse_array(body: &[u8]) -> Result<Vec<String>, PayloadError> {
    if body.is_empty() {
        return Err(PayloadError::Empty);
    }
    serde_json::from_slice::<Vec<String>>(body).map_err(|_| PayloadError::Broken)
}

/// Parses a SockJS WebSocket message: a JSON array of strings or a single
/// JSON string. An empty message carries nothing.
pub fn parse_ws(text: &str) -> Result<Vec<String>, PayloadError> {
    let t = text.trim();
    if t.is_empty() {
        return Ok(Vec::new());
    }
    if t.starts_with('[') {
        serde_json::from_str::<Vec<String>>(t).map_err(|_| PayloadError::Broken)
    } else {
        serde_json::from_str::<String>(t)
            .map(|s| vec![s])
            .map_err(|_| PayloadError::Broken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames() {
        assert_eq!(messages(&["a"]), r#"a["a"]"#);
        assert_eq!(messages(&["x", "y\"z"]), r#"a["x","y\"z"]"#);
        assert_eq!(close(3000, "Go away!"), r#"c[3000,"Go away!"]"#);
        assert_eq!(
            close(2010, "Another connection still open"),
            r#"c[2010,"Another connection still open"]"#
        );
    }

    #[test]
    fn escapes_what_browsers_mangle() {
        assert_eq!(json_string("  \u{0}\n\r "), r#""  \u0000\n\r ""#);
        assert_eq!(json_string("\u{2028}\u{2029}"), r#""\u2028\u2029""#);
        assert_eq!(json_string("\u{200c}\u{200f}"), r#""\u200c\u200f""#);
        assert_eq!(json_string("\u{2060}\u{206f}"), r#""\u2060\u206f""#);
        assert_eq!(json_string("\u{fff0}\u{ffff}"), r#""\ufff0\uffff""#);
        assert_eq!(json_string("\u{1f}\u{7f}"), r#""\u001f\u007f""#);
        // Ordinary non-ASCII text goes out verbatim.
        assert_eq!(json_string("héllo 日本 🎉"), "\"héllo 日本 🎉\"");
        assert_eq!(json_string("a\\b"), r#""a\\b""#);
    }

    #[test]
    fn escaped_strings_parse_back() {
        let all: String = (0u32..0x11000).filter_map(char::from_u32).collect();
        let enc = json_string(&all);
        let back: String = serde_json::from_str(&enc).expect("valid JSON");
        assert_eq!(back, all);
        // Nothing in the escape ranges is left raw.
        assert!(!enc.chars().any(must_escape));
    }

    #[test]
    fn parses_client_payloads() {
        assert_eq!(parse_array(b"[\"a\"]"), Ok(vec!["a".to_owned()]));
        assert_eq!(parse_array(b"[]"), Ok(vec![]));
        assert_eq!(parse_array(b""), Err(PayloadError::Empty));
        assert_eq!(parse_array(b"[\"x"), Err(PayloadError::Broken));
        assert_eq!(parse_array(b"[1]"), Err(PayloadError::Broken));
        assert_eq!(parse_ws(""), Ok(vec![]));
        assert_eq!(parse_ws("[]"), Ok(vec![]));
        assert_eq!(parse_ws("\"a\""), Ok(vec!["a".to_owned()]));
        assert_eq!(parse_ws("[\"a\",\"b\"]"), Ok(vec!["a".into(), "b".into()]));
        assert_eq!(parse_ws("[\"a"), Err(PayloadError::Broken));
        assert_eq!(
            parse_array(br#"["\u2028\ud83c\udf89"]"#),
            Ok(vec!["\u{2028}🎉".to_owned()])
        );
    }
}
