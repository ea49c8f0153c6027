//! RabbitMQ helpers: topology through the management HTTP API (with a drop
//! guard that deletes what a test declared, also when it fails) and
//! connection counts per vhost from `rabbitmqctl`, which is authoritative
//! (the management API's connection list lags by a few seconds). Tests that
//! count connections use a vhost of their own: the node is shared.

use crate::http;
use anyhow::{anyhow, bail, Context, Result};
use std::time::Duration;
use tokio::time::Instant;

/// The management API.
pub const MANAGEMENT: &str = "127.0.0.1:15672";
const AUTH: Option<(&str, &str)> = Some(("guest", "guest"));

/// A name unique to this run: `e2e.<what>.<random hex>`.
pub fn unique(what: &str) -> String {
    format!(
        "e2e.{what}.{:012x}",
        rand::random::<u64>() & 0xffff_ffff_ffff
    )
}

/// `/` as it appears in a management API path.
fn vhost_path(vhost: &str) -> String {
    if vhost == "/" {
        "%2F".to_owned()
    } else {
        vhost.to_owned()
    }
}

async fn mgmt(method: &'static str, path: String, body: Option<String>) -> Result<http::Response> {
    let r = http::request_async(method, MANAGEMENT.to_owned(), path.clone(), AUTH, body)
        .await
        .with_context(|| format!("management API {method} {path}"))?;
    if !(200..300).contains(&r.status) {
        bail!(
            "management API {method} {path}: HTTP {} {}",
            r.status,
            r.body
        );
    }
    Ok(r)
}

fn mgmt_blocking(method: &str, path: &str) {
    if let Err(e) = http::request(method, MANAGEMENT, path, AUTH, None) {
        eprintln!("cleanup {method} {path} failed: {e:#}");
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    Exchange(String, String),
    Queue(String, String),
    Vhost(String),
}

/// Exchanges, queues and vhosts a test declared (or caused RabbitMQ to
/// declare); all deleted on drop.
#[derive(Debug, Default)]
pub struct Topology {
    items: Vec<Item>,
}

impl Topology {
    pub fn new() -> Topology {
        Topology::default()
    }

    /// Declares a non-durable exchange of `kind` (`topic`, `direct`, ...) in `/`.
    pub async fn exchange(&mut self, name: &str, kind: &str) -> Result<()> {
        let body = serde_json::json!({ "type": kind, "durable": false, "auto_delete": false });
        self.items.push(Item::Exchange("/".into(), name.into()));
        mgmt(
            "PUT",
            format!("/api/exchanges/%2F/{name}"),
            Some(body.to_string()),
        )
        .await?;
        Ok(())
    }

    /// Declares a non-durable queue in `/`.
    pub async fn queue(&mut self, name: &str) -> Result<()> {
        let body = serde_json::json!({ "durable": false, "auto_delete": false });
        self.items.push(Item::Queue("/".into(), name.into()));
        mgmt(
            "PUT",
            format!("/api/queues/%2F/{name}"),
            Some(body.to_string()),
        )
        .await?;
        Ok(())
    }

    /// Deletes queue `name` (in `/`) on drop, for queues RabbitMQ creates
    /// itself (a `/queue/<name>` destination).
    pub fn track_queue(&mut self, name: &str) {
        self.items.push(Item::Queue("/".into(), name.into()));
    }

    /// Deletes exchange `name` (in `/`) on drop, for exchanges a gateway
    /// or a backend declares from its configuration.
    pub fn track_exchange(&mut self, name: &str) {
        self.items.push(Item::Exchange("/".into(), name.into()));
    }

    /// Binds queue `queue` to `exchange` with `routing_key` (in `/`). The
    /// binding goes away with the queue or the exchange.
    pub async fn bind(&mut self, exchange: &str, queue: &str, routing_key: &str) -> Result<()> {
        let body = serde_json::json!({ "routing_key": routing_key });
        mgmt(
            "POST",
            format!("/api/bindings/%2F/e/{exchange}/q/{queue}"),
            Some(body.to_string()),
        )
        .await?;
        Ok(())
    }

    /// Creates a vhost and gives `guest` full permissions on it.
    pub async fn vhost(&mut self, name: &str) -> Result<()> {
        self.items.push(Item::Vhost(name.into()));
        mgmt("PUT", format!("/api/vhosts/{name}"), Some("{}".into())).await?;
        let perms = serde_json::json!({ "configure": ".*", "write": ".*", "read": ".*" });
        mgmt(
            "PUT",
            format!("/api/permissions/{name}/guest"),
            Some(perms.to_string()),
        )
        .await?;
        Ok(())
    }

    /// Number of messages ready in a queue of `/`, per the management API
    /// (which lags; poll it).
    pub async fn queue_messages(name: &str) -> Result<u64> {
        let r = mgmt("GET", format!("/api/queues/%2F/{name}"), None).await?;
        let v: serde_json::Value = serde_json::from_str(&r.body)?;
        v.get("messages")
            .and_then(|m| m.as_u64())
            .ok_or_else(|| anyhow!("no `messages` in {}", r.body))
    }
}

/// `GET <path>` on the management API as JSON (an error unless 2xx).
pub async fn management_get(path: &str) -> Result<serde_json::Value> {
    let r = mgmt("GET", path.to_owned(), None).await?;
    serde_json::from_str(&r.body).with_context(|| format!("management API GET {path}: {}", r.body))
}

/// HTTP status of `GET <path>` on the management API (404 for a missing
/// entity), without failing on non-2xx.
pub async fn management_status(path: &str) -> Result<u16> {
    let r = http::request_async("GET", MANAGEMENT.to_owned(), path.to_owned(), AUTH, None)
        .await
        .with_context(|| format!("management API GET {path}"))?;
    Ok(r.status)
}

impl Drop for Topology {
    fn drop(&mut self) {
        for item in self.items.drain(..).rev() {
            match item {
                Item::Exchange(vh, name) => mgmt_blocking(
                    "DELETE",
                    &format!("/api/exchanges/{}/{name}", vhost_path(&vh)),
                ),
                Item::Queue(vh, name) => {
                    mgmt_blocking("DELETE", &format!("/api/queues/{}/{name}", vhost_path(&vh)))
                }
                Item::Vhost(name) => mgmt_blocking("DELETE", &format!("/api/vhosts/{name}")),
            }
        }
    }
}

/// Open RabbitMQ connections in `vhost` (any protocol, STOMP included),
/// from the node's connection tracking via `rabbitmqctl eval`. This is
/// authoritative, unlike the management API's lagging statistics; and
/// `rabbitmqctl list_connections` does not list STOMP connections.
pub async fn connection_count(vhost: &str) -> Result<usize> {
    if !vhost
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'))
    {
        bail!("vhost name {vhost:?} needs quoting");
    }
    let expr = format!("length(rabbit_connection_tracking:list(<<\"{vhost}\">>)).");
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(["-q", "eval", &expr])
        .output()
        .await
        .context("running rabbitmqctl eval")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "rabbitmqctl eval failed: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stdout
        .trim()
        .parse()
        .with_context(|| format!("unexpected rabbitmqctl output {stdout:?}"))
}

/// Polls [`connection_count`] until `pred` holds; returns the last count.
pub async fn wait_connection_count(
    vhost: &str,
    what: &str,
    timeout: Duration,
    pred: impl Fn(usize) -> bool,
) -> Result<usize> {
    let deadline = Instant::now() + timeout;
    loop {
        let n = connection_count(vhost).await?;
        if pred(n) {
            return Ok(n);
        }
        if Instant::now() >= deadline {
            bail!("RabbitMQ connections in vhost {vhost}: {what} not reached within {timeout:?} (now {n})");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `s` percent-encoded for one segment of a management API path (connection
/// names such as `127.0.0.1:5000 -> 127.0.0.1:5672` hold spaces and `>`).
pub fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The management API's record of the open connection whose client named
/// it `connection_name` (the AMQP `connection_name` client property), polled
/// until it is listed (new connections show up after a moment).
pub async fn wait_named_connection(
    connection_name: &str,
    timeout: Duration,
) -> Result<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let all = management_get("/api/connections").await?;
        let found = all.as_array().and_then(|a| {
            a.iter()
                .find(|c| c["client_properties"]["connection_name"] == connection_name)
                .cloned()
        });
        if let Some(c) = found {
            return Ok(c);
        }
        if Instant::now() >= deadline {
            bail!("no connection named {connection_name:?} listed within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Closes connection `name` (the management API's `name`, not the client's
/// connection name) the way an operator would: `DELETE /api/connections/<name>`.
pub async fn close_connection(name: &str) -> Result<()> {
    mgmt(
        "DELETE",
        format!("/api/connections/{}", path_segment(name)),
        None,
    )
    .await?;
    Ok(())
}
