//! A TCP proxy between the gateway and RabbitMQ, so a test can cut the
//! broker leg (every current connection) while the listener keeps accepting.

use anyhow::{bail, Result};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

#[derive(Debug, Default)]
struct Shared {
    conns: Mutex<HashMap<u64, AbortHandle>>,
    active: AtomicUsize,
    accepted: AtomicUsize,
    next_id: AtomicU64,
}

/// Decrements the active count and forgets the connection when its task
/// ends or is aborted.
struct ConnGuard {
    id: u64,
    shared: Arc<Shared>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.shared.active.fetch_sub(1, Ordering::SeqCst);
        if let Ok(mut m) = self.shared.conns.lock() {
            m.remove(&self.id);
        }
    }
}

/// A running proxy; stops (and closes every connection) on drop.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on 127.0.0.1:0 and forwards each connection to `upstream`.
    pub async fn start(upstream: &str) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let upstream = upstream.to_owned();
        let s = Arc::clone(&shared);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let id = s.next_id.fetch_add(1, Ordering::SeqCst);
                s.accepted.fetch_add(1, Ordering::SeqCst);
                s.active.fetch_add(1, Ordering::SeqCst);
                let guard = ConnGuard {
                    id,
                    shared: Arc::clone(&s),
                };
                let upstream = upstream.clone();
                // Hold the map lock across spawn+insert so the guard's remove
                // cannot run before the insert.
                let mut conns = s.conns.lock().unwrap_or_else(|e| e.into_inner());
                let task = tokio::spawn(async move {
                    let _guard = guard;
                    let mut client = client;
                    if let Ok(mut up) = TcpStream::connect(upstream.as_str()).await {
                        let _ = client.set_nodelay(true);
                        let _ = up.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                    }
                });
                conns.insert(id, task.abort_handle());
            }
        });
        Ok(Proxy {
            addr,
            shared,
            accept,
        })
    }

    /// Starts a proxy to the local RabbitMQ STOMP port.
    pub async fn to_rabbitmq() -> Result<Proxy> {
        Proxy::start("127.0.0.1:61613").await
    }

    /// `127.0.0.1:<port>` to give the gateway as a broker address.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Connections open through the proxy right now.
    pub fn connections(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// Connections accepted since the start.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Closes every current connection (both sides); new ones are still
    /// accepted. Returns how many were cut.
    pub fn cut(&self) -> usize {
        let handles: Vec<AbortHandle> = self
            .shared
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, h)| h)
            .collect();
        for h in &handles {
            h.abort();
        }
        handles.len()
    }

    /// Waits until `pred(connections())` holds.
    pub async fn wait_connections(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(usize) -> bool,
    ) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.connections();
            if pred(n) {
                return Ok(n);
            }
            if Instant::now() >= deadline {
                bail!("proxy connections: {what} not reached within {timeout:?} (now {n})");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
