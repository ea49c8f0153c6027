//! Admission control for client connections, from the moment they are
//! accepted (before any HTTP is read), so that connections that never upgrade
//! count too.
//!
//! - `server.max_connections`: one permit per accepted connection, held by
//!   the [`Ticket`] until the connection (or the session it became) ends.
//! - `server.max_connections_per_ip`: concurrent connections per client IP.
//! - `server.max_new_connections_per_ip_per_sec`: a token bucket per client
//!   IP (bursts of the same size).
//!
//! The client IP is the peer address, unless the peer is one of
//! `server.trusted_proxies`: then the per-IP limits are applied at the
//! upgrade request to the right-most `X-Forwarded-For` address that is not a
//! trusted proxy (see [`Admission::forwarded_client`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a connection was refused; `limit` names the setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `server.max_connections` reached.
    ConnectionLimit,
    /// `server.max_connections_per_ip` reached for this IP.
    PerIpLimit,
    /// `server.max_new_connections_per_ip_per_sec` exceeded for this IP.
    PerIpRate,
}

impl Refusal {
    /// The setting that refused the connection.
    pub fn limit(self) -> &'static str {
        match self {
            Refusal::ConnectionLimit => "server.max_connections",
            Refusal::PerIpLimit => "server.max_connections_per_ip",
            Refusal::PerIpRate => "server.max_new_connections_per_ip_per_sec",
        }
    }

    /// The HTTP answer: 503 for the process-wide limit, 429 per IP.
    pub fn status(self) -> u16 {
        match self {
            Refusal::ConnectionLimit => 503,
            Refusal::PerIpLimit | Refusal::PerIpRate => 429,
        }
    }
}

#[derive(Debug)]
struct IpEntry {
    active: usize,
    tokens: f64,
    at: Instant,
}

/// Per-IP entries are swept (idle ones dropped) when the table grows past
/// this many since the last sweep.
const SWEEP_EVERY: usize = 4096;

/// The connection limits of one listener. See the module docs.
#[derive(Debug)]
pub struct Admission {
    permits: Arc<Semaphore>,
    max_per_ip: usize,
    rate: u32,
    trusted: Vec<IpAddr>,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    ips: HashMap<IpAddr, IpEntry>,
    sweep_at: usize,
}

/// One admitted connection: releases its share of every limit when dropped.
#[derive(Debug)]
pub struct Ticket {
    _permit: OwnedSemaphorePermit,
    ip: Option<(Arc<Admission>, IpAddr)>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some((a, ip)) = self.ip.take() {
            a.release(ip);
        }
    }
}

impl Admission {
    pub fn new(
        max_connections: usize,
        max_per_ip: usize,
        rate: u32,
        trusted: &[String],
    ) -> Arc<Admission> {
        Arc::new(Admission {
            permits: Arc::new(Semaphore::new(max_connections)),
            max_per_ip,
            rate,
            trusted: trusted
                .iter()
                .filter_map(|t| t.trim().parse().ok())
                .collect(),
            table: Mutex::new(Table::default()),
        })
    }

    /// Whether `ip` is a trusted proxy (its `X-Forwarded-For` is believed).
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.contains(&ip)
    }

    /// Admits a connection just accepted from `peer`. A trusted proxy only
    /// takes a process-wide permit here; its clients are counted per IP at
    /// the upgrade ([`Admission::admit_forwarded`]).
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Ticket, Refusal> {
        let permit = self
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::ConnectionLimit)?;
        let mut ticket = Ticket {
            _permit: permit,
            ip: None,
        };
        if !self.is_trusted(peer) {
            self.take_ip(peer, Instant::now())?;
            ticket.ip = Some((self.clone(), peer));
        }
        Ok(ticket)
    }

    /// A process-wide permit alone, for a session that outlives its HTTP
    /// connections (SockJS); `None` at `server.max_connections`.
    pub fn admit_session(&self) -> Option<Ticket> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        Some(Ticket {
            _permit: permit,
            ip: None,
        })
    }

    /// Applies the per-IP limits to `client` (from `X-Forwarded-For`) for a
    /// connection that came through a trusted proxy.
    pub fn admit_forwarded(
        self: &Arc<Self>,
        ticket: &mut Ticket,
        client: IpAddr,
    ) -> Result<(), Refusal> {
        if ticket.ip.is_some() {
            return Ok(());
        }
        self.take_ip(client, Instant::now())?;
        ticket.ip = Some((self.clone(), client));
        Ok(())
    }

    /// The client behind a trusted proxy: the right-most address of
    /// `X-Forwarded-For` that is not itself a trusted proxy (addresses to
    /// its left could have been written by the client). `peer` itself when
    /// the peer is not trusted, or the header is missing or unparsable.
    pub fn forwarded_client(&self, peer: IpAddr, xff: Option<&str>) -> IpAddr {
        if !self.is_trusted(peer) {
            return peer;
        }
        let Some(xff) = xff else {
            return peer;
        };
        for part in xff.rsplit(',') {
            match part.trim().parse::<IpAddr>() {
                Ok(ip) if self.is_trusted(ip) => continue,
                Ok(ip) => return ip,
                Err(_) => return peer,
            }
        }
        peer
    }

    /// Connections currently counted for `ip`.
    pub fn active_for(&self, ip: IpAddr) -> usize {
        self.lock().ips.get(&ip).map_or(0, |e| e.active)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic while holding this lock cannot leave the table invalid.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_ip(&self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        let (max, rate) = (self.max_per_ip, self.rate);
        let mut t = self.lock();
        if t.ips.len() >= t.sweep_at {
            t.ips.retain(|_, e| {
                e.active > 0
                    || (rate > 0 && now.saturating_duration_since(e.at).as_secs_f64() < 1.0)
            });
            t.sweep_at = t.ips.len() + SWEEP_EVERY;
        }
        let burst = f64::from(rate);
        let e = t.ips.entry(ip).or_insert(IpEntry {
            active: 0,
            tokens: burst,
            at: now,
        });
        if max > 0 && e.active >= max {
            return Err(Refusal::PerIpLimit);
        }
        if rate > 0 {
            let elapsed = now.saturating_duration_since(e.at).as_secs_f64();
            e.tokens = (e.tokens + elapsed * burst).min(burst);
            e.at = now;
            if e.tokens < 1.0 {
                return Err(Refusal::PerIpRate);
            }
            e.tokens -= 1.0;
        }
        e.active += 1;
        Ok(())
    }

    fn release(&self, ip: IpAddr) {
        let mut t = self.lock();
        if let Some(e) = t.ips.get_mut(&ip) {
            e.active = e.active.saturating_sub(1);
            if e.active == 0 && self.rate == 0 {
                t.ips.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn global_and_per_ip_limits() {
        let a = Admission::new(3, 2, 0, &[]);
        let t1 = a.admit(ip("10.0.0.1")).unwrap();
        let _t2 = a.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(a.admit(ip("10.0.0.1")).unwrap_err(), Refusal::PerIpLimit);
        let _t3 = a.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(
            a.admit(ip("10.0.0.3")).unwrap_err(),
            Refusal::ConnectionLimit
        );
        drop(t1);
        assert_eq!(a.active_for(ip("10.0.0.1")), 1);
        let _t4 = a.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(Refusal::PerIpRate.status(), 429);
        assert_eq!(Refusal::ConnectionLimit.status(), 503);
    }

    #[test]
    fn new_connection_rate_per_ip() {
        let a = Admission::new(100, 0, 3, &[]);
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(a.admit(ip("10.0.0.1")).unwrap());
        }
        assert_eq!(a.admit(ip("10.0.0.1")).unwrap_err(), Refusal::PerIpRate);
        // Another address has its own bucket.
        held.push(a.admit(ip("10.0.0.2")).unwrap());
        // Refill over time (a third of a second gives one token at 3/s).
        let now = Instant::now() + std::time::Duration::from_millis(400);
        assert!(a.take_ip(ip("10.0.0.1"), now).is_ok());
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let a = Admission::new(100, 1, 0, &["10.0.0.9".into(), "10.0.0.8".into()]);
        let proxy = ip("10.0.0.9");
        assert_eq!(
            a.forwarded_client(proxy, Some("6.6.6.6, 1.2.3.4, 10.0.0.8")),
            ip("1.2.3.4")
        );
        assert_eq!(a.forwarded_client(proxy, None), proxy);
        assert_eq!(a.forwarded_client(proxy, Some("junk")), proxy);
        // An untrusted peer's header is ignored.
        assert_eq!(
            a.forwarded_client(ip("5.5.5.5"), Some("1.2.3.4")),
            ip("5.5.5.5")
        );
        // Through the proxy: not counted at accept, counted per client.
        let mut t1 = a.admit(proxy).unwrap();
        let mut t2 = a.admit(proxy).unwrap();
        a.admit_forwarded(&mut t1, ip("1.2.3.4")).unwrap();
        assert_eq!(
            a.admit_forwarded(&mut t2, ip("1.2.3.4")).unwrap_err(),
            Refusal::PerIpLimit
        );
        a.admit_forwarded(&mut t2, ip("1.2.3.5")).unwrap();
        drop(t1);
        assert_eq!(a.active_for(ip("1.2.3.4")), 0);
    }
}
