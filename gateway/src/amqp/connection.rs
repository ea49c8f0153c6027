//! AMQP connections and URL failover: every connection (control and
//! publish) tries `amqp.url`, then each of `amqp.failover_urls`, in order,
//! and takes the first that answers. The publish connections live in a
//! `deadpool` pool managed here.

use super::*;

/// Connects to the first of `urls` that answers within `timeout` (each);
/// returns the connection and the index of its URL, or every URL's failure
/// (passwords masked).
pub(super) async fn connect_any(
    urls: &[String],
    tls: &OwnedTLSConfig,
    props: impl Fn() -> ConnectionProperties,
    timeout: Duration,
) -> Result<(Connection, usize), String> {
    let mut failures = Vec::with_capacity(urls.len());
    for (i, url) in urls.iter().enumerate() {
        let runtime = lapin::runtime::default_runtime().map_err(|e| e.to_string())?;
        let attempt = Connection::connect_with_config(url, props(), tls.clone(), runtime);
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(conn)) => return Ok((conn, i)),
            Ok(Err(e)) => failures.push(format!("{}: {e}", mask_url_password(url))),
            Err(_) => failures.push(format!(
                "{}: no connection within {} ms (amqp.connect_timeout_ms)",
                mask_url_password(url),
                timeout.as_millis()
            )),
        }
    }
    Err(failures.join("; "))
}

/// Creates the publish connections of the pool, with the same URL
/// failover and TLS as the control connection.
pub(super) struct PublishManager {
    pub(super) urls: Arc<Vec<String>>,
    pub(super) tls: OwnedTLSConfig,
    pub(super) name: String,
    pub(super) connect_timeout: Duration,
}

impl deadpool::managed::Manager for PublishManager {
    type Type = Connection;
    type Error = String;

    async fn create(&self) -> Result<Connection, String> {
        let props =
            || ConnectionProperties::default().with_connection_name(self.name.clone().into());
        let (conn, i) = connect_any(&self.urls, &self.tls, props, self.connect_timeout).await?;
        debug!(
            "AMQP publish connection opened to {}",
            self.urls
                .get(i)
                .map(|u| mask_url_password(u))
                .unwrap_or_default()
        );
        Ok(conn)
    }

    async fn recycle(&self, conn: &mut Connection, _: &Metrics) -> RecycleResult<String> {
        if conn.status().connected() {
            Ok(())
        } else {
            Err(RecycleError::message(format!(
                "the AMQP publish connection is {}",
                conn.status().state_name()
            )))
        }
    }
}

pub(super) type PublishPool = deadpool::managed::Pool<PublishManager>;

impl Inner {
    /// Opens the control connection to the first URL that answers; returns
    /// it and that node (its URL, password masked).
    pub(super) async fn connect(&self) -> Result<(Connection, String), String> {
        let name = format!("stomp-gateway {} control", self.pod_id);
        let props = || ConnectionProperties::default().with_connection_name(name.clone().into());
        let (conn, i) = connect_any(&self.urls, &self.tls, props, self.connect_timeout()).await?;
        let node = self
            .urls
            .get(i)
            .map(|u| mask_url_password(u))
            .unwrap_or_default();
        let which = if i == 0 {
            "amqp.url".to_owned()
        } else {
            format!("amqp.failover_urls[{}]", i - 1)
        };
        info!(
            node = %node,
            "AMQP control plane connected to {node} ({which}) as \"{name}\""
        );
        Ok((conn, node))
    }
}

pub(super) trait StateName {
    fn state_name(&self) -> String;
}

impl StateName for lapin::ConnectionStatus {
    fn state_name(&self) -> String {
        let s = if self.closed() {
            "closed"
        } else if self.closing() {
            "closing"
        } else if self.errored() {
            "failed"
        } else if self.connecting() || self.reconnecting() {
            "connecting"
        } else {
            "not connected"
        };
        s.to_owned()
    }
}
