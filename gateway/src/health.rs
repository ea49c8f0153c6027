//! Process health shared by the system link, the client sessions and the
//! admin listener.
//!
//! Liveness (`/healthz`) is "the process answers"; readiness (`/readyz`) is
//! [`Health::is_ready`]: the system link to the broker is up, the AMQP control
//! plane is up (once one was started) and the process is not shutting down.

use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Shared health state. Cheap to update from any task.
#[derive(Debug, Default)]
pub struct Health {
    system_link_up: AtomicBool,
    shutting_down: AtomicBool,
    active_sessions: AtomicUsize,
    link: Mutex<LinkInfo>,
    /// Set by the first `set_amqp_*` call: from then on readiness needs the
    /// AMQP control plane too.
    amqp_enabled: AtomicBool,
    amqp_up: AtomicBool,
    /// Why the AMQP connection was last lost (kept after it reconnects).
    amqp_error: Mutex<Option<String>>,
    /// The AMQP node (URL, password masked) of the control connection while
    /// it is up.
    amqp_node: Mutex<Option<String>>,
    /// Whether the broker connections use TLS (`broker.tls.enabled`).
    broker_tls: AtomicBool,
    /// This process's name (`Config::pod_id`), once someone set it.
    pod_id: Mutex<Option<String>>,
    /// `broker.mode = "embedded"`: no system link, readiness does not need one.
    embedded: AtomicBool,
    /// The shared fan-out runs (relay mode with a `[fanout]` prefix
    /// `shared`): readiness needs its upstream too.
    shared_enabled: AtomicBool,
    /// The shared upstream's queue while it is up (`None`: down).
    shared_queue: Mutex<Option<String>>,
}

#[derive(Debug, Default)]
struct LinkInfo {
    /// Broker address of the system link while it is up.
    address: Option<String>,
    /// Why the system link was last lost (kept after it reconnects).
    last_error: Option<String>,
}

impl Health {
    /// A fresh state: link down, no sessions, not shutting down.
    pub fn new() -> Health {
        Health::default()
    }

    fn link(&self) -> MutexGuard<'_, LinkInfo> {
        // The data is two strings; a panic elsewhere cannot leave it torn.
        self.link.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The system link is connected to `address`.
    pub fn set_system_link_up(&self, address: &str) {
        self.link().address = Some(address.to_owned());
        self.system_link_up.store(true, Ordering::SeqCst);
    }

    /// The system link is down (or could not connect) because of `error`.
    pub fn set_system_link_down(&self, error: &str) {
        self.system_link_up.store(false, Ordering::SeqCst);
        let mut link = self.link();
        link.address = None;
        link.last_error = Some(error.to_owned());
    }

    /// Whether the system link is up.
    pub fn system_link_up(&self) -> bool {
        self.system_link_up.load(Ordering::SeqCst)
    }

    /// The broker address of the system link while it is up.
    pub fn system_link_address(&self) -> Option<String> {
        self.link().address.clone()
    }

    /// Why the system link was last lost, if it ever was.
    pub fn last_error(&self) -> Option<String> {
        self.link().last_error.clone()
    }

    /// The AMQP control plane is connected and its topology declared.
    pub fn set_amqp_up(&self) {
        self.amqp_enabled.store(true, Ordering::SeqCst);
        self.amqp_up.store(true, Ordering::SeqCst);
    }

    /// [`Health::set_amqp_up`], with the control connection on `node` (its
    /// URL with the password masked).
    pub fn set_amqp_up_at(&self, node: &str) {
        *lock(&self.amqp_node) = Some(node.to_owned());
        self.set_amqp_up();
    }

    /// The AMQP control plane is down (or could not connect) because of `error`.
    pub fn set_amqp_down(&self, error: &str) {
        self.amqp_enabled.store(true, Ordering::SeqCst);
        self.amqp_up.store(false, Ordering::SeqCst);
        *lock(&self.amqp_node) = None;
        *lock(&self.amqp_error) = Some(error.to_owned());
    }

    /// The AMQP node of the control connection while it is up.
    pub fn amqp_node(&self) -> Option<String> {
        lock(&self.amqp_node).clone()
    }

    /// Whether the broker connections use TLS.
    pub fn set_broker_tls(&self, enabled: bool) {
        self.broker_tls.store(enabled, Ordering::SeqCst);
    }

    /// Whether the broker connections use TLS.
    pub fn broker_tls(&self) -> bool {
        self.broker_tls.load(Ordering::SeqCst)
    }

    /// Names this process in the readiness details.
    pub fn set_pod_id(&self, pod_id: &str) {
        *lock(&self.pod_id) = Some(pod_id.to_owned());
    }

    /// This process's name, once set.
    pub fn pod_id(&self) -> Option<String> {
        lock(&self.pod_id).clone()
    }

    /// This process runs the embedded broker (`broker.mode = "embedded"`):
    /// there is no system link, and readiness does not wait for one.
    pub fn set_embedded(&self) {
        self.embedded.store(true, Ordering::SeqCst);
    }

    /// This process runs the shared fan-out; readiness waits for its upstream.
    pub fn set_shared_enabled(&self) {
        self.shared_enabled.store(true, Ordering::SeqCst);
    }

    /// The shared fan-out's upstream connected with this queue (`Some`) or
    /// was lost (`None`).
    pub fn set_shared_up(&self, queue: Option<&str>) {
        *lock(&self.shared_queue) = queue.map(str::to_owned);
    }

    fn shared_up(&self) -> bool {
        lock(&self.shared_queue).is_some()
    }

    /// `"embedded"` or `"relay"`.
    pub fn mode(&self) -> &'static str {
        if self.embedded.load(Ordering::SeqCst) {
            "embedded"
        } else {
            "relay"
        }
    }

    /// Whether the AMQP control plane is up.
    pub fn amqp_up(&self) -> bool {
        self.amqp_up.load(Ordering::SeqCst)
    }

    /// Whether an AMQP control plane reports here (it then counts for
    /// readiness).
    pub fn amqp_enabled(&self) -> bool {
        self.amqp_enabled.load(Ordering::SeqCst)
    }

    /// Why the AMQP connection was last lost, if it ever was.
    pub fn amqp_last_error(&self) -> Option<String> {
        lock(&self.amqp_error).clone()
    }

    /// From now on the process reports not ready (drain).
    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Whether [`Health::set_shutting_down`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// A client session started.
    pub fn session_opened(&self) {
        self.active_sessions.fetch_add(1, Ordering::Relaxed);
    }

    /// A client session ended. Never goes below zero.
    pub fn session_closed(&self) {
        let _ = self
            .active_sessions
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Client sessions currently open.
    pub fn active_sessions(&self) -> usize {
        self.active_sessions.load(Ordering::Relaxed)
    }

    /// Ready for traffic: the system link is up (relay mode), the AMQP
    /// control plane is up (if one reports here) and not shutting down.
    pub fn is_ready(&self) -> bool {
        (self.system_link_up() || self.embedded.load(Ordering::SeqCst))
            && (!self.amqp_enabled() || self.amqp_up())
            && (!self.shared_enabled.load(Ordering::SeqCst) || self.shared_up())
            && !self.is_shutting_down()
    }

    /// The `/readyz` body:
    /// `{"ready", "mode", "pod_id", "system_link": {"up", "address", "tls", "last_error"},
    /// "amqp": {"enabled", "up", "node", "last_error"}, "shared": {"enabled", "up", "queue"},
    /// "active_sessions", "shutting_down"}`.
    pub fn details(&self) -> serde_json::Value {
        let (address, last_error) = {
            let link = self.link();
            (link.address.clone(), link.last_error.clone())
        };
        json!({
            "ready": self.is_ready(),
            "mode": self.mode(),
            "pod_id": self.pod_id(),
            "system_link": {
                "up": self.system_link_up(),
                "address": address,
                "tls": self.broker_tls(),
                "last_error": last_error,
            },
            "amqp": {
                "enabled": self.amqp_enabled(),
                "up": self.amqp_up(),
                "node": self.amqp_node(),
                "last_error": self.amqp_last_error(),
            },
            "shared": {
                "enabled": self.shared_enabled.load(Ordering::SeqCst),
                "up": self.shared_up(),
                "queue": lock(&self.shared_queue).clone(),
            },
            "active_sessions": self.active_sessions(),
            "shutting_down": self.is_shutting_down(),
        })
    }
}

/// Locks a mutex of plain data: a panic elsewhere cannot leave it torn.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_link_and_shutdown() {
        let h = Health::new();
        assert!(!h.is_ready());
        h.set_system_link_up("127.0.0.1:61613");
        assert!(h.is_ready());
        assert_eq!(h.system_link_address().as_deref(), Some("127.0.0.1:61613"));
        h.set_system_link_down("connection reset");
        assert!(!h.is_ready());
        assert_eq!(h.system_link_address(), None);
        assert_eq!(h.last_error().as_deref(), Some("connection reset"));
        h.set_system_link_up("127.0.0.1:61614");
        assert!(h.is_ready());
        assert_eq!(h.last_error().as_deref(), Some("connection reset"));
        h.set_shutting_down();
        assert!(!h.is_ready());
    }

    #[test]
    fn readiness_needs_amqp_once_a_control_plane_reports() {
        let h = Health::new();
        h.set_system_link_up("127.0.0.1:61613");
        assert!(h.is_ready(), "no control plane: AMQP does not count");
        assert!(!h.amqp_enabled());
        h.set_amqp_down("connection refused");
        assert!(h.amqp_enabled());
        assert!(!h.is_ready());
        assert_eq!(h.amqp_last_error().as_deref(), Some("connection refused"));
        h.set_amqp_up_at("amqp://guest:******@127.0.0.1:5672/%2f");
        assert!(h.amqp_up());
        assert!(h.is_ready());
        assert_eq!(
            h.details()["amqp"],
            json!({
                "enabled": true,
                "up": true,
                "node": "amqp://guest:******@127.0.0.1:5672/%2f",
                "last_error": "connection refused",
            })
        );
        h.set_amqp_down("reset");
        assert_eq!(h.amqp_node(), None, "no node while down");
        h.set_amqp_up();
        assert_eq!(h.amqp_node(), None);
        h.set_system_link_down("reset");
        assert!(!h.is_ready(), "both links are needed");
        h.set_system_link_up("127.0.0.1:61613");
        h.set_shutting_down();
        assert!(!h.is_ready());
    }

    #[test]
    fn embedded_mode_is_ready_without_a_system_link() {
        let h = Health::new();
        h.set_embedded();
        assert!(h.is_ready());
        assert_eq!(h.details()["mode"], "embedded");
        h.set_amqp_down("refused");
        assert!(!h.is_ready(), "an explicit control plane still counts");
        h.set_amqp_up();
        h.set_shutting_down();
        assert!(!h.is_ready());
    }

    #[test]
    fn readiness_waits_for_the_shared_upstream_when_it_runs() {
        let h = Health::new();
        h.set_system_link_up("127.0.0.1:61613");
        h.set_shared_enabled();
        assert!(!h.is_ready());
        h.set_shared_up(Some("amq.gen-x"));
        assert!(h.is_ready());
        assert_eq!(
            h.details()["shared"],
            json!({"enabled": true, "up": true, "queue": "amq.gen-x"})
        );
        h.set_shared_up(None);
        assert!(!h.is_ready());
    }

    #[test]
    fn session_counter_never_underflows() {
        let h = Health::new();
        h.session_closed();
        assert_eq!(h.active_sessions(), 0);
        h.session_opened();
        h.session_opened();
        h.session_closed();
        assert_eq!(h.active_sessions(), 1);
    }

    #[test]
    fn details_shape() {
        let h = Health::new();
        h.session_opened();
        h.set_system_link_down("refused");
        let d = h.details();
        assert_eq!(
            d,
            json!({
                "ready": false,
                "mode": "relay",
                "pod_id": null,
                "system_link": {"up": false, "address": null, "tls": false, "last_error": "refused"},
                "amqp": {"enabled": false, "up": false, "node": null, "last_error": null},
                "shared": {"enabled": false, "up": false, "queue": null},
                "active_sessions": 1,
                "shutting_down": false,
            })
        );
        h.set_pod_id("gw-1");
        h.set_broker_tls(true);
        h.set_system_link_up("rabbit:61614");
        let d = h.details();
        assert_eq!(d["pod_id"], "gw-1");
        assert_eq!(
            d["system_link"],
            json!({"up": true, "address": "rabbit:61614", "tls": true, "last_error": "refused"})
        );
    }
}
