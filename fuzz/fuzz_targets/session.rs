//! Coverage-guided fuzzing of the relay session state machine.
//!
//! The input is a script: each step is an op byte followed by its operands
//! (a client or broker frame built from a table of relevant commands and
//! header names with fuzzed values, a clock advance, a broker failure, a
//! publish confirm, a drain, a half-sent frame, a WebSocket violation, an
//! oversized broker frame, a shared subscription bound or refused, a slow
//! consumer, a lost upstream, ...). The first byte picks whether the shared
//! path is on. Limits are small so they are reached. Checks: no panic; nothing happens after
//! the session closed; a client close action closes the session; a timer
//! fired at its deadline never asks to be fired again at the same instant;
//! one input never produces an unbounded amount of output.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_core::heartbeat::HeartBeat;
use relay_core::router::Router;
use relay_core::session::{Action, Session, SessionConfig, SharedPaths, ToClient, ToShared};
use relay_core::{Command, DecodeError, Frame};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CLIENT: [Command; 13] = [
    Command::Connect,
    Command::Stomp,
    Command::Send,
    Command::Subscribe,
    Command::Unsubscribe,
    Command::Ack,
    Command::Nack,
    Command::Begin,
    Command::Commit,
    Command::Abort,
    Command::Disconnect,
    Command::Message,
    Command::Connected,
];
const BROKER: [Command; 5] = [
    Command::Connected,
    Command::Message,
    Command::Receipt,
    Command::Error,
    Command::Send,
];
const NAMES: [&str; 17] = [
    "destination",
    "id",
    "receipt",
    "transaction",
    "ack",
    "heart-beat",
    "accept-version",
    "content-type",
    "subscription",
    "receipt-id",
    "message",
    "version",
    "host",
    "x-custom",
    "durable",
    "stomp-user",
    "content-length",
];
const VALUES: [&str; 14] = [
    "/queue/a",
    "/topic/b",
    "/app/c",
    "/user/queue/d",
    "/user/bob/queue/e",
    "/exchange/x/y",
    "/queue",
    "1.2",
    "1.0,1.1",
    "0,0",
    "1,1",
    "30000,30000",
    "tx1",
    "s1",
];

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn text(&mut self) -> Option<String> {
        let b = self.byte()?;
        if b < 0x80 {
            return Some(VALUES[usize::from(b) % VALUES.len()].to_owned());
        }
        let n = usize::from(b & 0x1f).min(self.0.len());
        let (t, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(String::from_utf8_lossy(t).into_owned())
    }
    fn frame(&mut self, commands: &[Command]) -> Option<Frame> {
        let mut f = Frame::new(commands[usize::from(self.byte()?) % commands.len()]);
        let n = self.byte()? % 6;
        for _ in 0..n {
            let name = NAMES[usize::from(self.byte()?) % NAMES.len()];
            let value = self.text()?;
            f = f.with_header(name, value);
        }
        let body = usize::from(self.byte()? % 8) * 100;
        Some(f.with_body(vec![b'x'; body]))
    }
}

fn config(shared: bool) -> Arc<SessionConfig> {
    Arc::new(SessionConfig {
        shared: SharedPaths {
            topic: shared,
            exchange: shared,
            user: shared,
        },
        open_relay_at_connect: !shared,
        client_heartbeat: HeartBeat::new(1_000, 1_000),
        broker_heartbeat: HeartBeat::new(2_000, 2_000),
        connect_timeout: Duration::from_secs(3),
        broker_timeout: Duration::from_secs(4),
        max_subscriptions: 3,
        max_pending_frames: 3,
        router: Router::new(
            vec!["/queue/".into(), "/topic/".into(), "/exchange/".into()],
            vec!["/app/".into()],
            Some("/user/".into()),
        )
        .with_control_plane(true)
        .with_user_send(true),
        max_inflight_publishes: 3,
        max_transactions: 2,
        max_transaction_bytes: 1_000,
        max_sends_per_sec: 5,
        send_burst: 3,
        frame_timeout: Duration::from_secs(2),
        ..SessionConfig::default()
    })
}

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let mut now = t0;
    let mut input = Input(data);
    let shared = input.byte().is_some_and(|b| b & 1 == 1);
    let mut s = Session::new(config(shared), "fz", now);
    let mut publishes: Vec<u64> = Vec::new();
    let mut binds: Vec<String> = Vec::new();
    let mut steps = 0;
    while let Some(op) = input.byte() {
        steps += 1;
        if steps > 200 {
            break;
        }
        let was_closed = s.is_closed();
        match op % 19 {
            0 | 1 => {
                let Some(f) = input.frame(&CLIENT) else { break };
                s.handle_client_frame(now, f);
            }
            2 | 3 => {
                let Some(f) = input.frame(&BROKER) else { break };
                s.handle_broker_frame(now, f);
            }
            4 => {
                let Some(b) = input.byte() else { break };
                now += Duration::from_millis(u64::from(b) * 50);
                if let Some(t) = s.poll_timeout() {
                    if t <= now {
                        s.handle_timeout(t);
                        drain(&mut s, &mut publishes, &mut binds, was_closed);
                        if let Some(u) = s.poll_timeout() {
                            assert!(u > t || s.is_closed(), "timer at {t:?} re-armed at {u:?}");
                        }
                        s.handle_timeout(now);
                    }
                }
            }
            5 => s.handle_broker_failed(now, "fuzz"),
            6 => s.handle_client_closed(now),
            7 => s.handle_drain(now),
            8 => s.handle_shutdown(now),
            9 => {
                let Some(b) = input.byte() else { break };
                if let Some(id) = publishes.pop() {
                    let res = if b & 1 == 0 {
                        Ok(())
                    } else {
                        Err("nack".to_owned())
                    };
                    s.handle_publish_result(now, id, res);
                }
            }
            10 => s.handle_client_decode_error(now, &DecodeError::MissingNul),
            11 => {
                let Some(b) = input.byte() else { break };
                s.handle_client_partial(now, b & 1 == 1);
            }
            12 => s.handle_client_websocket_error(now, 1002, "Invalid frame", "fuzz", None),
            13 => s.handle_broker_frame_too_large(now, 65_536),
            14 | 15 => {
                let Some(b) = input.byte() else { break };
                if let Some(id) = binds.pop() {
                    if b & 1 == 0 {
                        s.handle_shared_subscribed(now, &id);
                    } else {
                        s.handle_shared_failed(now, &id, "refused");
                    }
                }
            }
            16 => s.handle_slow_consumer(now, "fuzz"),
            17 => s.handle_shared_lost(now, "fuzz"),
            _ => {
                s.handle_client_activity(now);
                s.handle_broker_activity(now);
            }
        }
        drain(&mut s, &mut publishes, &mut binds, was_closed);
        assert!(s.shared_subscription_count() <= s.subscription_count());
    }
});

fn drain(s: &mut Session, publishes: &mut Vec<u64>, binds: &mut Vec<String>, was_closed: bool) {
    let mut n = 0;
    while let Some(a) = s.poll_action() {
        n += 1;
        assert!(n < 64, "one input produced too many actions");
        assert!(!was_closed, "action {a:?} after the session closed");
        match a {
            Action::Client(ToClient::Close(_)) => assert!(s.is_closed()),
            Action::App(p) => publishes.push(p.id),
            Action::Shared(ToShared::Subscribe { id, .. }) => binds.push(id),
            _ => {}
        }
    }
}
