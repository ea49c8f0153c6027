//! The local fan-out hub: which local sessions subscribed to what, and one
//! encoding of a message shared by all of them.
//!
//! The hub is a per-process table from a destination key (the destination
//! as the client subscribed it, e.g. `/topic/chat.1`) to the local
//! subscribers of that key, each a (session, subscription id) pair. It is
//! sans-IO: the caller owns the sessions' outbound queues and the upstream
//! (an AMQP binding, or nothing at all for the embedded broker).
//!
//! - [`Hub::subscribe`] says whether the subscriber is the key's first, and
//!   [`Hub::unsubscribe`] / [`Hub::remove_session`] say when the last one
//!   left, so the caller opens and closes the upstream subscription exactly
//!   once per key.
//! - [`Hub::deliver`] names who gets a message published to a key: every
//!   subscriber ([`Distribution::Broadcast`], `/topic/`), or the next one in
//!   turn ([`Distribution::RoundRobin`], `/queue/` in the embedded broker).
//!   Messages are handed out in the order they are delivered, so a caller
//!   that delivers a key's messages in order keeps that order per subscriber.
//! - [`SharedMessage`] encodes a MESSAGE once per STOMP version: only the
//!   per-subscriber headers (`subscription`, `message-id`, `ack`) differ, so
//!   each session writes a short prefix plus the shared encoded rest.

use crate::codec::{encode_header, encode_rest};
use crate::frame::{Command, Frame, Version};
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

/// Identifies a local session in the hub (the caller's own numbering).
pub type SessionKey = u64;

/// How the messages of one key are spread over its subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distribution {
    /// Every subscriber gets every message (publish-subscribe, `/topic/`).
    Broadcast,
    /// Each message goes to one subscriber, in turn (point-to-point, `/queue/`).
    RoundRobin,
}

/// One local subscription.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Subscriber {
    pub session: SessionKey,
    /// The client's subscription id.
    pub subscription: Arc<str>,
}

/// What [`Hub::unsubscribe`] removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribed {
    /// The key the subscription was on.
    pub key: Arc<str>,
    /// Whether it was the key's last subscriber (close the upstream).
    pub last: bool,
}

/// Why a subscription was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    #[error("subscription id {0:?} is already in use in this session")]
    DuplicateSubscription(String),
    #[error(
        "destination {key:?} is already served as {existing:?}; it cannot also be {requested:?}"
    )]
    DistributionMismatch {
        key: String,
        existing: Distribution,
        requested: Distribution,
    },
}

#[derive(Debug)]
struct Entry {
    distribution: Distribution,
    /// In subscription order (round-robin walks it).
    subscribers: Vec<Subscriber>,
    /// Round-robin: index of the next subscriber to serve.
    cursor: usize,
}

/// The subscription table. See the module documentation.
#[derive(Debug, Default)]
pub struct Hub {
    keys: HashMap<Arc<str>, Entry>,
    /// Per session: subscription id → key.
    sessions: HashMap<SessionKey, HashMap<Arc<str>, Arc<str>>>,
    /// Total subscriptions.
    count: usize,
}

impl Hub {
    pub fn new() -> Hub {
        Hub::default()
    }

    /// Adds `subscription` of `session` to `key`. `Ok(true)` when it is the
    /// key's first local subscriber: open the upstream subscription.
    pub fn subscribe(
        &mut self,
        session: SessionKey,
        subscription: &str,
        key: &str,
        distribution: Distribution,
    ) -> Result<bool, HubError> {
        let subs = self.sessions.entry(session).or_default();
        if subs.contains_key(subscription) {
            return Err(HubError::DuplicateSubscription(subscription.to_owned()));
        }
        if let Some(entry) = self.keys.get(key) {
            if entry.distribution != distribution {
                if subs.is_empty() {
                    self.sessions.remove(&session);
                }
                return Err(HubError::DistributionMismatch {
                    key: key.to_owned(),
                    existing: entry.distribution,
                    requested: distribution,
                });
            }
        }
        let subscription: Arc<str> = Arc::from(subscription);
        let (key, first) = match self.keys.get_key_value(key) {
            Some((k, _)) => (k.clone(), false),
            None => (Arc::<str>::from(key), true),
        };
        subs.insert(subscription.clone(), key.clone());
        self.keys
            .entry(key)
            .or_insert_with(|| Entry {
                distribution,
                subscribers: Vec::new(),
                cursor: 0,
            })
            .subscribers
            .push(Subscriber {
                session,
                subscription,
            });
        self.count += 1;
        Ok(first)
    }

    /// Removes one subscription; `None` if the session has no such id.
    pub fn unsubscribe(&mut self, session: SessionKey, subscription: &str) -> Option<Unsubscribed> {
        let subs = self.sessions.get_mut(&session)?;
        let key = subs.remove(subscription)?;
        if subs.is_empty() {
            self.sessions.remove(&session);
        }
        let last = self.detach(&key, session, subscription);
        Some(Unsubscribed { key, last })
    }

    /// Removes every subscription of a session (it closed). Returns the keys
    /// it was the last subscriber of: close their upstream subscriptions.
    pub fn remove_session(&mut self, session: SessionKey) -> Vec<Arc<str>> {
        let Some(subs) = self.sessions.remove(&session) else {
            return Vec::new();
        };
        let mut emptied = Vec::new();
        for (subscription, key) in subs {
            if self.detach(&key, session, &subscription) {
                emptied.push(key);
            }
        }
        emptied
    }

    /// Takes one subscriber off a key's list; true if the key is now empty
    /// (and gone from the table).
    fn detach(&mut self, key: &str, session: SessionKey, subscription: &str) -> bool {
        let Some(entry) = self.keys.get_mut(key) else {
            return false;
        };
        if let Some(i) = entry
            .subscribers
            .iter()
            .position(|s| s.session == session && &*s.subscription == subscription)
        {
            entry.subscribers.remove(i);
            self.count -= 1;
            // Keep the round-robin turn on the subscriber that was next.
            if i < entry.cursor {
                entry.cursor -= 1;
            }
            if entry.cursor >= entry.subscribers.len() {
                entry.cursor = 0;
            }
        }
        if entry.subscribers.is_empty() {
            self.keys.remove(key);
            true
        } else {
            false
        }
    }

    /// Calls `to` for each subscriber that gets a message published to
    /// `key`, in subscription order (every subscriber, or the next one in
    /// turn for [`Distribution::RoundRobin`]). Returns how many were called.
    pub fn deliver(&mut self, key: &str, mut to: impl FnMut(&Subscriber)) -> usize {
        let Some(entry) = self.keys.get_mut(key) else {
            return 0;
        };
        match entry.distribution {
            Distribution::Broadcast => {
                entry.subscribers.iter().for_each(&mut to);
                entry.subscribers.len()
            }
            Distribution::RoundRobin => {
                // Non-empty: empty entries are removed.
                let i = entry.cursor % entry.subscribers.len();
                entry.cursor = (i + 1) % entry.subscribers.len();
                to(&entry.subscribers[i]);
                1
            }
        }
    }

    /// Subscribers of `key`.
    pub fn subscribers(&self, key: &str) -> &[Subscriber] {
        self.keys
            .get(key)
            .map(|e| e.subscribers.as_slice())
            .unwrap_or(&[])
    }

    /// The key a session's subscription is on.
    pub fn key_of(&self, session: SessionKey, subscription: &str) -> Option<&Arc<str>> {
        self.sessions.get(&session)?.get(subscription)
    }

    /// Every key with at least one subscriber (to re-open upstream
    /// subscriptions after the upstream was lost).
    pub fn keys(&self) -> impl Iterator<Item = &Arc<str>> {
        self.keys.keys()
    }

    /// Number of keys with subscribers.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Number of subscriptions over all keys.
    pub fn subscription_count(&self) -> usize {
        self.count
    }
}

/// The headers each subscriber's copy of a message carries on its own.
pub const PER_SUBSCRIBER_HEADERS: [&str; 3] = ["subscription", "message-id", "ack"];

/// A MESSAGE whose shared part (every header but the per-subscriber ones,
/// and the body) is encoded at most once per STOMP version, on first use.
/// Share it between sessions behind an [`Arc`].
#[derive(Debug)]
pub struct SharedMessage {
    headers: Vec<(String, String)>,
    body: Bytes,
    encoded: [OnceLock<Bytes>; 3],
}

impl SharedMessage {
    /// A message with these headers (`destination`, `content-type`, ...;
    /// any per-subscriber header in it is dropped) and body.
    pub fn new(mut headers: Vec<(String, String)>, body: Bytes) -> SharedMessage {
        headers.retain(|(k, _)| !PER_SUBSCRIBER_HEADERS.contains(&k.as_str()));
        SharedMessage {
            headers,
            body,
            encoded: Default::default(),
        }
    }

    /// The shared headers.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// The first value of a shared header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The encoded shared part for `version`: the shared header lines,
    /// `content-length`, the blank line, the body and the NUL.
    pub fn rest(&self, version: Version) -> &Bytes {
        let slot = match version {
            Version::V1_0 => &self.encoded[0],
            Version::V1_1 => &self.encoded[1],
            Version::V1_2 => &self.encoded[2],
        };
        slot.get_or_init(|| {
            let mut out = BytesMut::new();
            encode_rest(
                Command::Message,
                &self.headers,
                &self.body,
                version,
                &mut out,
            );
            out.freeze()
        })
    }

    /// Writes one subscriber's complete MESSAGE frame: the command line, its
    /// own headers (`ack` only when given), then [`SharedMessage::rest`].
    pub fn write(
        &self,
        version: Version,
        subscription: &str,
        message_id: &str,
        ack: Option<&str>,
        out: &mut BytesMut,
    ) {
        let rest = self.rest(version);
        out.reserve(
            rest.len() + 48 + subscription.len() + message_id.len() + ack.map_or(0, str::len),
        );
        out.put_slice(b"MESSAGE\n");
        encode_header(Command::Message, "subscription", subscription, version, out);
        encode_header(Command::Message, "message-id", message_id, version, out);
        if let Some(ack) = ack {
            encode_header(Command::Message, "ack", ack, version, out);
        }
        out.put_slice(rest);
    }

    /// The same message as a [`Frame`] for one subscriber (for code paths
    /// that take frames; [`SharedMessage::write`] avoids the re-encoding).
    pub fn to_frame(&self, subscription: &str, message_id: &str, ack: Option<&str>) -> Frame {
        let mut headers = Vec::with_capacity(self.headers.len() + 3);
        headers.push(("subscription".to_owned(), subscription.to_owned()));
        headers.push(("message-id".to_owned(), message_id.to_owned()));
        if let Some(ack) = ack {
            headers.push(("ack".to_owned(), ack.to_owned()));
        }
        headers.extend(self.headers.iter().cloned());
        Frame {
            command: Command::Message,
            headers,
            body: self.body.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{encode_to_bytes, Decoder, Item};
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashSet};

    fn names(subs: &[Subscriber]) -> Vec<(SessionKey, String)> {
        subs.iter()
            .map(|s| (s.session, s.subscription.to_string()))
            .collect()
    }

    #[test]
    fn first_and_last_subscriber_per_key() {
        let mut hub = Hub::new();
        assert_eq!(
            hub.subscribe(1, "a", "/topic/x", Distribution::Broadcast),
            Ok(true)
        );
        assert_eq!(
            hub.subscribe(2, "a", "/topic/x", Distribution::Broadcast),
            Ok(false)
        );
        assert_eq!(
            hub.subscribe(1, "b", "/topic/y", Distribution::Broadcast),
            Ok(true)
        );
        assert_eq!(hub.key_count(), 2);
        assert_eq!(hub.subscription_count(), 3);
        let left = hub.unsubscribe(1, "a").expect("subscribed");
        assert_eq!((&*left.key, left.last), ("/topic/x", false));
        let left = hub.unsubscribe(2, "a").expect("subscribed");
        assert_eq!((&*left.key, left.last), ("/topic/x", true));
        assert_eq!(hub.unsubscribe(2, "a"), None);
        assert_eq!(hub.key_count(), 1);
        // Re-subscribing after the last left opens the key again.
        assert_eq!(
            hub.subscribe(3, "z", "/topic/x", Distribution::Broadcast),
            Ok(true)
        );
    }

    #[test]
    fn duplicate_subscription_id_is_refused_per_session() {
        let mut hub = Hub::new();
        hub.subscribe(1, "s", "/topic/x", Distribution::Broadcast)
            .expect("first");
        assert_eq!(
            hub.subscribe(1, "s", "/topic/y", Distribution::Broadcast),
            Err(HubError::DuplicateSubscription("s".into()))
        );
        // Another session may use the same id.
        assert_eq!(
            hub.subscribe(2, "s", "/topic/x", Distribution::Broadcast),
            Ok(false)
        );
        assert_eq!(hub.key_count(), 1, "the refused key was not created");
    }

    #[test]
    fn a_key_keeps_its_distribution() {
        let mut hub = Hub::new();
        hub.subscribe(1, "s", "/queue/q", Distribution::RoundRobin)
            .expect("first");
        assert!(matches!(
            hub.subscribe(2, "s", "/queue/q", Distribution::Broadcast),
            Err(HubError::DistributionMismatch { .. })
        ));
        assert_eq!(hub.subscription_count(), 1);
        assert!(hub.key_of(2, "s").is_none());
    }

    #[test]
    fn remove_session_reports_the_keys_it_emptied() {
        let mut hub = Hub::new();
        hub.subscribe(1, "a", "/topic/x", Distribution::Broadcast)
            .expect("ok");
        hub.subscribe(1, "b", "/topic/y", Distribution::Broadcast)
            .expect("ok");
        hub.subscribe(2, "a", "/topic/y", Distribution::Broadcast)
            .expect("ok");
        let mut emptied: Vec<String> = hub
            .remove_session(1)
            .iter()
            .map(|k| k.to_string())
            .collect();
        emptied.sort();
        assert_eq!(emptied, vec!["/topic/x".to_string()]);
        assert_eq!(names(hub.subscribers("/topic/y")), vec![(2, "a".into())]);
        assert!(hub.remove_session(1).is_empty());
        assert_eq!(hub.subscription_count(), 1);
    }

    #[test]
    fn broadcast_reaches_every_subscriber_in_subscription_order() {
        let mut hub = Hub::new();
        for s in [3, 1, 2] {
            hub.subscribe(s, "sub", "/topic/x", Distribution::Broadcast)
                .expect("ok");
        }
        let mut got = Vec::new();
        assert_eq!(hub.deliver("/topic/x", |s| got.push(s.session)), 3);
        assert_eq!(got, vec![3, 1, 2]);
        assert_eq!(hub.deliver("/topic/none", |_| panic!("nobody")), 0);
    }

    #[test]
    fn round_robin_takes_turns_and_survives_leaves() {
        let mut hub = Hub::new();
        for s in 1..=3 {
            hub.subscribe(s, "q", "/queue/work", Distribution::RoundRobin)
                .expect("ok");
        }
        let next = |hub: &mut Hub| {
            let mut who = 0;
            assert_eq!(hub.deliver("/queue/work", |s| who = s.session), 1);
            who
        };
        assert_eq!((next(&mut hub), next(&mut hub), next(&mut hub)), (1, 2, 3));
        assert_eq!(next(&mut hub), 1);
        // 2 is next; removing 1 (before the cursor) keeps 2 next.
        hub.unsubscribe(1, "q");
        assert_eq!((next(&mut hub), next(&mut hub)), (2, 3));
        // Removing the one that is next hands the turn to the one after.
        assert_eq!(next(&mut hub), 2);
        hub.unsubscribe(3, "q");
        assert_eq!((next(&mut hub), next(&mut hub)), (2, 2));
    }

    /// Decodes exactly one frame from `bytes`.
    fn decode_one(bytes: &[u8], version: Version) -> Frame {
        let mut d = Decoder::default();
        d.set_version(version);
        d.extend(bytes);
        match d.decode() {
            Ok(Some(Item::Frame(f))) => {
                assert_eq!(d.buffered(), 0, "one frame, nothing after it");
                f
            }
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    #[test]
    fn shared_message_is_encoded_once_per_version() {
        let m = SharedMessage::new(
            vec![
                ("destination".into(), "/topic/x".into()),
                ("subscription".into(), "dropped".into()),
                ("content-type".into(), "text/plain".into()),
            ],
            Bytes::from_static(b"hello"),
        );
        assert_eq!(m.header("subscription"), None);
        let a = m.rest(Version::V1_2).clone();
        let b = m.rest(Version::V1_2).clone();
        assert_eq!(a.as_ptr(), b.as_ptr(), "the same buffer, not re-encoded");
        let mut out = BytesMut::new();
        m.write(Version::V1_2, "sub-0", "m-1", None, &mut out);
        assert_eq!(
            &out[..],
            &b"MESSAGE\nsubscription:sub-0\nmessage-id:m-1\ndestination:/topic/x\ncontent-type:text/plain\ncontent-length:5\n\nhello\0"[..]
        );
    }

    fn header_text() -> impl Strategy<Value = String> {
        // Everything the escaping rules care about, and some plain text.
        proptest::string::string_regex("[a-z:\\\\\r\n é-]{0,12}").expect("regex")
    }

    proptest! {
        /// Prefix plus shared rest is the same frame, on the wire and once
        /// decoded, as encoding the whole MESSAGE for that subscriber.
        #[test]
        fn prefix_plus_rest_equals_whole_frame(
            headers in proptest::collection::vec(("[a-z][a-z:-]{0,8}", header_text()), 0..5),
            subscription in header_text(),
            message_id in header_text(),
            ack in proptest::option::of(header_text()),
            body in proptest::collection::vec(any::<u8>(), 0..32),
        ) {
            let headers: Vec<(String, String)> = headers
                .into_iter()
                .filter(|(k, _)| !PER_SUBSCRIBER_HEADERS.contains(&k.as_str()))
                .collect();
            let m = SharedMessage::new(headers, Bytes::from(body));
            for version in Version::ALL {
                let mut out = BytesMut::new();
                m.write(version, &subscription, &message_id, ack.as_deref(), &mut out);
                let whole = encode_to_bytes(&m.to_frame(&subscription, &message_id, ack.as_deref()), version);
                prop_assert_eq!(&out[..], &whole[..]);
                if version == Version::V1_2 {
                    // 1.0 cannot carry LF, 1.1 a trailing CR; 1.2 round-trips.
                    let decoded = decode_one(&out, version);
                    prop_assert_eq!(decoded.header("subscription"), Some(subscription.as_str()));
                    prop_assert_eq!(decoded.header("message-id"), Some(message_id.as_str()));
                    prop_assert_eq!(&decoded.body, m.body());
                }
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Subscribe { session: u64, sub: u8, key: u8 },
        Unsubscribe { session: u64, sub: u8 },
        Close { session: u64 },
        Publish { key: u8 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..5u64, 0..3u8, 0..3u8).prop_map(|(session, sub, key)| Op::Subscribe { session, sub, key }),
            2 => (0..5u64, 0..3u8).prop_map(|(session, sub)| Op::Unsubscribe { session, sub }),
            1 => (0..5u64).prop_map(|session| Op::Close { session }),
            6 => (0..3u8).prop_map(|key| Op::Publish { key }),
        ]
    }

    proptest! {
        /// Join and leave under traffic against a plain model: every
        /// subscriber gets exactly the messages published to its key while
        /// it was subscribed, once each, in publish order; the upstream is
        /// opened on the first subscriber and closed on the last, exactly
        /// once each, so it is open exactly while the key has subscribers.
        #[test]
        fn broadcast_matches_model(ops in proptest::collection::vec(op(), 1..200)) {
            let mut hub = Hub::new();
            // (session, sub) -> key
            let mut model: BTreeMap<(u64, String), String> = BTreeMap::new();
            let mut upstream_open: HashSet<String> = HashSet::new();
            // What each (session, sub, key) subscription got, and should have.
            let mut got: BTreeMap<(u64, String), Vec<u64>> = BTreeMap::new();
            let mut want: BTreeMap<(u64, String), Vec<u64>> = BTreeMap::new();
            let mut seq = 0u64;
            let close_key = |k: &str, open: &mut HashSet<String>| {
                assert!(open.remove(k), "closed twice or never opened: {k}");
            };
            for op in ops {
                match op {
                    Op::Subscribe { session, sub, key } => {
                        let (sub, key) = (format!("s{sub}"), format!("/topic/{key}"));
                        let res = hub.subscribe(session, &sub, &key, Distribution::Broadcast);
                        if model.contains_key(&(session, sub.clone())) {
                            prop_assert!(res.is_err());
                        } else {
                            let first = !model.values().any(|k| *k == key);
                            prop_assert_eq!(res, Ok(first));
                            if first {
                                prop_assert!(upstream_open.insert(key.clone()), "opened twice");
                            }
                            model.insert((session, sub.clone()), key);
                            // A new subscription starts a new record.
                            got.insert((session, sub.clone()), Vec::new());
                            want.insert((session, sub), Vec::new());
                        }
                    }
                    Op::Unsubscribe { session, sub } => {
                        let sub = format!("s{sub}");
                        let res = hub.unsubscribe(session, &sub);
                        match model.remove(&(session, sub.clone())) {
                            None => prop_assert_eq!(res, None),
                            Some(key) => {
                                let res = res.expect("subscribed");
                                prop_assert_eq!(&*res.key, key.as_str());
                                let last = !model.values().any(|k| *k == key);
                                prop_assert_eq!(res.last, last);
                                if last { close_key(&key, &mut upstream_open); }
                                prop_assert_eq!(got.remove(&(session, sub.clone())), want.remove(&(session, sub)));
                            }
                        }
                    }
                    Op::Close { session } => {
                        let mut emptied: Vec<String> = hub.remove_session(session).iter().map(|k| k.to_string()).collect();
                        emptied.sort();
                        let mine: Vec<(u64, String)> = model.keys().filter(|(s, _)| *s == session).cloned().collect();
                        let mut keys = Vec::new();
                        for k in mine {
                            keys.push(model.remove(&k).expect("in model"));
                            prop_assert_eq!(got.remove(&k), want.remove(&k));
                        }
                        let mut expected: Vec<String> = keys.into_iter().filter(|k| !model.values().any(|v| v == k)).collect();
                        expected.sort();
                        expected.dedup();
                        prop_assert_eq!(&emptied, &expected);
                        for k in &emptied { close_key(k, &mut upstream_open); }
                    }
                    Op::Publish { key } => {
                        let key = format!("/topic/{key}");
                        seq += 1;
                        let mut n = 0;
                        hub.deliver(&key, |s| {
                            n += 1;
                            got.get_mut(&(s.session, s.subscription.to_string())).expect("known subscriber").push(seq);
                        });
                        for ((s, sub), k) in &model {
                            if *k == key {
                                want.get_mut(&(*s, sub.clone())).expect("recorded").push(seq);
                            }
                        }
                        prop_assert_eq!(n, model.values().filter(|k| **k == key).count());
                    }
                }
                let live: HashSet<String> = hub.keys().map(|k| k.to_string()).collect();
                prop_assert_eq!(&live, &upstream_open);
                prop_assert_eq!(hub.subscription_count(), model.len());
            }
            prop_assert_eq!(got, want);
        }

        /// Round-robin under join and leave: each message goes to exactly
        /// one current subscriber, none is lost while someone listens, and
        /// with a stable set nobody gets a second message before everyone
        /// got one.
        #[test]
        fn round_robin_delivers_each_message_once(ops in proptest::collection::vec(op(), 1..200)) {
            let mut hub = Hub::new();
            let mut members: BTreeMap<(u64, String), ()> = BTreeMap::new();
            let mut since_change: BTreeMap<(u64, String), usize> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Subscribe { session, sub, .. } => {
                        let sub = format!("s{sub}");
                        if hub.subscribe(session, &sub, "/queue/q", Distribution::RoundRobin).is_ok() {
                            members.insert((session, sub), ());
                            since_change.clear();
                        }
                    }
                    Op::Unsubscribe { session, sub } => {
                        let sub = format!("s{sub}");
                        if hub.unsubscribe(session, &sub).is_some() {
                            members.remove(&(session, sub));
                            since_change.clear();
                        }
                    }
                    Op::Close { session } => {
                        hub.remove_session(session);
                        members.retain(|(s, _), _| *s != session);
                        since_change.clear();
                    }
                    Op::Publish { .. } => {
                        let mut who = Vec::new();
                        let n = hub.deliver("/queue/q", |s| who.push((s.session, s.subscription.to_string())));
                        prop_assert_eq!(n, usize::from(!members.is_empty()));
                        for w in who {
                            prop_assert!(members.contains_key(&w));
                            let c = since_change.entry(w).or_default();
                            *c += 1;
                        }
                        let max = since_change.values().max().copied().unwrap_or(0);
                        let total: usize = since_change.values().sum();
                        // Fair: the spread between members is at most one turn.
                        prop_assert!(max <= total.div_ceil(members.len().max(1)));
                    }
                }
            }
        }
    }
}
