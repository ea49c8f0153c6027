//! Sockets: the file-descriptor limit, source-address spreading and the TCP
//! connect that binds a source address first.

use anyhow::{bail, Context, Result};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use tokio::net::{TcpSocket, TcpStream};

/// Raises the soft `RLIMIT_NOFILE` to the hard limit. Returns (soft, hard)
/// after the change.
pub fn raise_nofile_limit() -> Result<(u64, u64)> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("setrlimit(RLIMIT_NOFILE)")?;
    }
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    Ok((soft, hard))
}

/// Source addresses to spread connections over, picked round-robin by
/// session index.
#[derive(Debug, Clone, Default)]
pub struct SourceIps {
    ips: Vec<IpAddr>,
}

impl SourceIps {
    /// Parses `127.0.0.2-127.0.0.50` (an inclusive IPv4 range), a comma
    /// separated list, or a mix (`127.0.0.2-127.0.0.9,127.0.0.20`).
    pub fn parse(spec: &str) -> Result<SourceIps> {
        let mut ips = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if let Some((a, b)) = part.split_once('-') {
                let a: Ipv4Addr = a
                    .trim()
                    .parse()
                    .with_context(|| format!("bad IPv4 {a:?}"))?;
                let b: Ipv4Addr = b
                    .trim()
                    .parse()
                    .with_context(|| format!("bad IPv4 {b:?}"))?;
                let (a, b) = (u32::from(a), u32::from(b));
                if b < a {
                    bail!("empty address range {part:?}");
                }
                if b - a >= 65536 {
                    bail!("address range {part:?} is too large");
                }
                ips.extend((a..=b).map(|n| IpAddr::V4(Ipv4Addr::from(n))));
            } else {
                ips.push(
                    part.parse()
                        .with_context(|| format!("bad IP address {part:?}"))?,
                );
            }
        }
        if ips.is_empty() {
            bail!("no source addresses in {spec:?}");
        }
        Ok(SourceIps { ips })
    }

    /// The address for session `i`, or `None` when no addresses were given.
    pub fn pick(&self, i: usize) -> Option<IpAddr> {
        if self.ips.is_empty() {
            None
        } else {
            Some(self.ips[i % self.ips.len()])
        }
    }

    pub fn len(&self) -> usize {
        self.ips.len()
    }
}

/// Opens a TCP connection to `addr`, binding `source` (port chosen by the
/// kernel) first when given. `TCP_NODELAY` is set, as browsers do.
pub async fn tcp_connect(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let stream = match source {
        None => TcpStream::connect(addr).await?,
        Some(ip) => {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            socket.set_nonblocking(true)?;
            socket.bind(&SocketAddr::new(ip, 0).into())?;
            TcpSocket::from_std_stream(socket.into())
                .connect(addr)
                .await?
        }
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_and_lists() -> Result<()> {
        let s = SourceIps::parse("127.0.0.2-127.0.0.4, 127.0.0.9")?;
        assert_eq!(s.len(), 4);
        assert_eq!(s.pick(0), Some("127.0.0.2".parse()?));
        assert_eq!(s.pick(3), Some("127.0.0.9".parse()?));
        assert_eq!(s.pick(4), Some("127.0.0.2".parse()?));
        assert!(SourceIps::parse("127.0.0.5-127.0.0.4").is_err());
        assert!(SourceIps::parse("").is_err());
        assert!(SourceIps::parse("x").is_err());
        assert_eq!(SourceIps::default().pick(7), None);
        Ok(())
    }
}
