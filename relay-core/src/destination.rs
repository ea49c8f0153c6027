//! Destination rules: which path serves a destination.
//!
//! This is the one place that decides between relaying to the broker,
//! publishing to backends (application prefixes) and user destinations.
//! Shared fan-out will be one more [`Route`] here.

/// The path that serves a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Relayed to the broker as is (`/topic/`, `/queue/`, `/exchange/`, ...).
    Relay,
    /// An application destination (`/app/...`), served by backends.
    App,
    /// A user destination (`/user/...`).
    User,
    /// No prefix serves it.
    Unroutable,
}

/// Prefix tables, checked in order: relay, application, user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Router {
    relay: Vec<String>,
    app: Vec<String>,
    user: Option<String>,
}

impl Default for Router {
    /// Spring's defaults for a RabbitMQ relay.
    fn default() -> Self {
        Router::new(
            [
                "/topic/",
                "/queue/",
                "/exchange/",
                "/amq/queue/",
                "/temp-queue/",
                "/reply-queue/",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            vec!["/app/".into()],
            Some("/user/".into()),
        )
    }
}

impl Router {
    pub fn new(relay: Vec<String>, app: Vec<String>, user: Option<String>) -> Router {
        Router {
            relay,
            app,
            user: user.filter(|u| !u.is_empty()),
        }
    }

    /// Classifies `destination`. Matching is by plain prefix; a destination
    /// equal to a prefix with nothing after it is not served.
    pub fn route(&self, destination: &str) -> Route {
        let matches =
            |p: &String| destination.len() > p.len() && destination.starts_with(p.as_str());
        if self.relay.iter().any(matches) {
            Route::Relay
        } else if self.app.iter().any(matches) {
            Route::App
        } else if self.user.iter().any(matches) {
            Route::User
        } else {
            Route::Unroutable
        }
    }

    /// The relay prefixes, for error messages.
    pub fn relay_prefixes(&self) -> &[String] {
        &self.relay
    }

    /// Every prefix a client may use, for the unknown-destination error:
    /// the relay prefixes, then (with the AMQP control plane) the
    /// application prefixes and the user prefix.
    pub fn served_prefixes(&self, control_plane: bool) -> Vec<&str> {
        let mut all: Vec<&str> = self.relay.iter().map(String::as_str).collect();
        if control_plane {
            all.extend(self.app.iter().map(String::as_str));
            all.extend(self.user.as_deref());
        }
        all
    }

    /// The application prefixes.
    pub fn app_prefixes(&self) -> &[String] {
        &self.app
    }

    /// The user prefix.
    pub fn user_prefix(&self) -> Option<&str> {
        self.user.as_deref()
    }
}

/// Escapes a user name for use as one word of an AMQP routing key: `%`, `.`,
/// `*`, `#`, `/` and control or space characters are percent-encoded, so a
/// name can neither add routing-key words nor act as a wildcard.
pub fn escape_user(user: &str) -> String {
    let mut out = String::with_capacity(user.len());
    for c in user.chars() {
        match c {
            '%' | '.' | '*' | '#' | '/' => out.push_str(&format!("%{:02X}", c as u32)),
            c if c.is_control() || c == ' ' => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("%{b:02X}"));
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// The routing key that reaches every session of `user` subscribed to
/// `/user/<rest>` (for example `rest = "queue/notifications"`): the escaped
/// user name, then `rest` with `/` turned into `.`.
pub fn user_routing_key(user: &str, rest: &str) -> String {
    let rest = rest.trim_start_matches('/').replace('/', ".");
    format!("{}.{rest}", escape_user(user))
}

/// The routing key for an application destination: the destination without
/// its prefix, `/` turned into `.` (`/app/chat/send` → `chat.send`).
pub fn app_routing_key(prefix: &str, destination: &str) -> Option<String> {
    let rest = destination.strip_prefix(prefix)?;
    if rest.is_empty() {
        return None;
    }
    Some(rest.trim_matches('/').replace('/', "."))
}

/// Splits a SEND destination `/user/<name>/<rest>` into the user name and
/// `<rest>`.
pub fn split_user_send(prefix: &str, destination: &str) -> Option<(String, String)> {
    let rest = destination.strip_prefix(prefix)?;
    let (user, rest) = rest.split_once('/')?;
    if user.is_empty() || rest.is_empty() {
        return None;
    }
    Some((user.to_owned(), rest.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes() {
        let r = Router::default();
        assert_eq!(r.route("/topic/room.42"), Route::Relay);
        assert_eq!(r.route("/exchange/adme.exchange/room.42"), Route::Relay);
        assert_eq!(r.route("/amq/queue/q1"), Route::Relay);
        assert_eq!(r.route("/temp-queue/reply"), Route::Relay);
        assert_eq!(r.route("/app/chat.sendMessage"), Route::App);
        assert_eq!(r.route("/user/queue/notifications"), Route::User);
        assert_eq!(r.route("/nowhere/x"), Route::Unroutable);
        assert_eq!(r.route("/topic/"), Route::Unroutable);
        assert_eq!(r.route("topic/x"), Route::Unroutable);
        assert_eq!(r.route(""), Route::Unroutable);
    }

    #[test]
    fn empty_user_prefix_serves_nothing() {
        let r = Router::new(vec!["/topic/".into()], vec![], Some(String::new()));
        assert_eq!(r.route("/user/x"), Route::Unroutable);
        assert_eq!(r.user_prefix(), None);
    }

    #[test]
    fn user_names_cannot_widen_routing() {
        assert_eq!(escape_user("alice"), "alice");
        assert_eq!(escape_user("a.b*#/%"), "a%2Eb%2A%23%2F%25");
        assert_eq!(escape_user("x y\n"), "x%20y%0A");
        assert_eq!(
            user_routing_key("alice", "queue/notifications"),
            "alice.queue.notifications"
        );
        assert_eq!(user_routing_key("a.b", "queue/x"), "a%2Eb.queue.x");
        // "alice.queue" cannot collide with user "alice" on another destination.
        assert_ne!(
            user_routing_key("alice.queue", "queue/x"),
            user_routing_key("alice", "queue/queue/x")
        );
    }

    #[test]
    fn app_and_user_send_destinations() {
        assert_eq!(
            app_routing_key("/app/", "/app/chat.sendMessage").as_deref(),
            Some("chat.sendMessage")
        );
        assert_eq!(
            app_routing_key("/app/", "/app/chat/send").as_deref(),
            Some("chat.send")
        );
        assert_eq!(app_routing_key("/app/", "/app/"), None);
        assert_eq!(app_routing_key("/app/", "/topic/x"), None);
        assert_eq!(
            split_user_send("/user/", "/user/bob/queue/x"),
            Some(("bob".into(), "queue/x".into()))
        );
        assert_eq!(split_user_send("/user/", "/user/queue"), None);
        assert_eq!(split_user_send("/user/", "/user//queue/x"), None);
    }
}
