//! Heart-beat negotiation (STOMP 1.1+, "Heart-beating").
//!
//! Each side announces `cx,cy`: it can send every `cx` ms and wants to
//! receive every `cy` ms (0 = cannot / does not want). The sender's effective
//! interval is `max(own send, peer's wanted receive)` when both are non-zero;
//! likewise for receiving.

use std::time::Duration;

/// A `heart-beat` header value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HeartBeat {
    /// How often this side can send, in ms (0 = never).
    pub send_ms: u64,
    /// How often this side wants to receive, in ms (0 = never).
    pub receive_ms: u64,
}

/// An invalid `heart-beat` header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid heart-beat header {0:?}: expected two non-negative integers like \"10000,10000\"")]
pub struct InvalidHeartBeat(pub String);

impl HeartBeat {
    pub fn new(send_ms: u64, receive_ms: u64) -> HeartBeat {
        HeartBeat {
            send_ms,
            receive_ms,
        }
    }

    /// Parses `"cx,cy"`. A missing header means `0,0`.
    pub fn parse(value: Option<&str>) -> Result<HeartBeat, InvalidHeartBeat> {
        let Some(v) = value else {
            return Ok(HeartBeat::default());
        };
        let bad = || InvalidHeartBeat(v.to_owned());
        let (a, b) = v.split_once(',').ok_or_else(bad)?;
        let send_ms = a.trim().parse::<u64>().map_err(|_| bad())?;
        let receive_ms = b.trim().parse::<u64>().map_err(|_| bad())?;
        Ok(HeartBeat {
            send_ms,
            receive_ms,
        })
    }

    /// The header value, `"cx,cy"`.
    pub fn header_value(self) -> String {
        format!("{},{}", self.send_ms, self.receive_ms)
    }
}

/// Effective intervals for one side of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Negotiated {
    /// Send something at least this often (`None` = never).
    pub send: Option<Duration>,
    /// Expect something at least this often (`None` = don't check).
    pub receive: Option<Duration>,
}

/// Negotiates from our announcement and the peer's.
pub fn negotiate(ours: HeartBeat, theirs: HeartBeat) -> Negotiated {
    let pick = |a: u64, b: u64| {
        if a == 0 || b == 0 {
            None
        } else {
            Some(Duration::from_millis(a.max(b)))
        }
    };
    Negotiated {
        send: pick(ours.send_ms, theirs.receive_ms),
        receive: pick(ours.receive_ms, theirs.send_ms),
    }
}

/// The gateway's announcement to a client, RabbitMQ's way: each side of
/// `configured` that is 0 mirrors the client's wish (we send as often as the
/// client wants to receive, and want to receive as often as it can send),
/// a non-zero side is a fixed offer. Every non-zero result is raised to
/// `min_ms`, so a client cannot make the gateway beat every millisecond; a
/// client that offers `0,0` gets `0,0`.
pub fn mirror(configured: HeartBeat, client: HeartBeat, min_ms: u64) -> HeartBeat {
    let side = |fixed: u64, wish: u64| {
        let v = if fixed == 0 { wish } else { fixed };
        if v == 0 {
            0
        } else {
            v.max(min_ms)
        }
    };
    HeartBeat {
        send_ms: side(configured.send_ms, client.receive_ms),
        receive_ms: side(configured.receive_ms, client.send_ms),
    }
}

/// How long silence is tolerated before a peer counts as dead: twice the
/// negotiated interval, as RabbitMQ and most clients do.
pub fn receive_deadline(interval: Duration) -> Duration {
    interval * 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_format() {
        assert_eq!(HeartBeat::parse(None), Ok(HeartBeat::new(0, 0)));
        assert_eq!(
            HeartBeat::parse(Some("10000,5000")),
            Ok(HeartBeat::new(10000, 5000))
        );
        assert_eq!(HeartBeat::parse(Some(" 1 , 2 ")), Ok(HeartBeat::new(1, 2)));
        assert!(HeartBeat::parse(Some("10")).is_err());
        assert!(HeartBeat::parse(Some("a,b")).is_err());
        assert!(HeartBeat::parse(Some("-1,0")).is_err());
        assert_eq!(HeartBeat::new(3, 4).header_value(), "3,4");
    }

    /// The negotiation table of issue 10: the client's wish mirrored,
    /// clamped to the 1000 ms minimum.
    #[test]
    fn mirror_table() {
        let mirrored = HeartBeat::new(0, 0);
        for (client, answer, send, receive) in [
            ((0, 0), (0, 0), None, None),
            ((1, 1), (1000, 1000), Some(1000), Some(1000)),
            ((1000, 1000), (1000, 1000), Some(1000), Some(1000)),
            ((30000, 30000), (30000, 30000), Some(30000), Some(30000)),
            // Asymmetric: we send as often as the client wants to receive.
            ((0, 5000), (5000, 0), Some(5000), None),
            ((4000, 0), (0, 4000), None, Some(4000)),
        ] {
            let c = HeartBeat::new(client.0, client.1);
            let ours = mirror(mirrored, c, 1000);
            assert_eq!((ours.send_ms, ours.receive_ms), answer, "client {client:?}");
            let n = negotiate(ours, c);
            assert_eq!(n.send.map(|d| d.as_millis() as u64), send, "{client:?}");
            assert_eq!(
                n.receive.map(|d| d.as_millis() as u64),
                receive,
                "{client:?}"
            );
        }
        // A fixed side is offered as configured (and negotiated as before).
        let ours = mirror(HeartBeat::new(10_000, 0), HeartBeat::new(1, 1), 1000);
        assert_eq!(ours, HeartBeat::new(10_000, 1000));
    }

    #[test]
    fn negotiation_takes_the_larger_and_zero_disables() {
        let n = negotiate(
            HeartBeat::new(10_000, 10_000),
            HeartBeat::new(4_000, 20_000),
        );
        assert_eq!(n.send, Some(Duration::from_secs(20)));
        assert_eq!(n.receive, Some(Duration::from_secs(10)));
        let n = negotiate(HeartBeat::new(10_000, 10_000), HeartBeat::new(0, 0));
        assert_eq!(n, Negotiated::default());
        let n = negotiate(HeartBeat::new(0, 10_000), HeartBeat::new(5_000, 5_000));
        assert_eq!(n.send, None);
        assert_eq!(n.receive, Some(Duration::from_secs(10)));
    }
}
