//! One SockJS session and the table of live ones.
//!
//! A session outlives the HTTP requests that carry it: messages for the
//! client wait in its outbox until a receiving request (a poll, a stream, or
//! the WebSocket pump) takes them; messages from the client wait in its
//! inbox until the handler reads them through its [`Conn`]. Both are bounded
//! in bytes: a full outbox makes the handler's sink wait (backpressure), a
//! full inbox makes `xhr_send` wait.
//!
//! A session with no receiving request for `disconnect_delay` is timed out
//! and removed by the table's sweeper; its handler then sees the end of the
//! message stream.

use futures_util::{Sink, Stream};
use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// Close code and reason when the receiving request was cut.
pub const INTERRUPTED: (u16, &str) = (1002, "Connection interrupted");
/// Close code and reason for a second receiving request.
pub const ANOTHER_CONNECTION: (u16, &str) = (2010, "Another connection still open");
/// Close code and reason when the handler ends without saying why.
pub const NORMAL: (u16, &str) = (1000, "Normal closure");

/// What the receiving side takes from a session.
#[derive(Debug, PartialEq, Eq)]
pub enum Outgoing {
    /// Messages for one `a[...]` frame.
    Messages(Vec<String>),
    /// The session is closed: send `c[code,"reason"]`.
    Close(u16, String),
    /// Nothing yet.
    Nothing,
}

#[derive(Debug)]
struct State {
    outbox: VecDeque<String>,
    outbox_bytes: usize,
    sink_waker: Option<Waker>,
    inbox: VecDeque<String>,
    inbox_bytes: usize,
    inbox_waker: Option<Waker>,
    /// A receiving request is attached.
    receiving: bool,
    /// Set once: the close frame every later request gets.
    close: Option<(u16, String)>,
    /// The client side is over (timed out, interrupted, closed): the
    /// handler's stream ends and its sink fails.
    gone: bool,
    /// When the last receiving request ended (or the session was created).
    idle_since: Instant,
}

/// One SockJS session (see the module documentation).
#[derive(Debug)]
pub struct Session {
    id: String,
    state: Mutex<State>,
    /// Wakes the attached receiver when there is something to send.
    wake_receiver: Notify,
    /// Wakes a waiting `xhr_send` when the inbox has room.
    inbox_room: Notify,
    limit: usize,
}

impl Session {
    /// A new session; `limit` bounds its outbox and its inbox (bytes).
    pub fn new(id: String, limit: usize, now: Instant) -> Arc<Session> {
        Arc::new(Session {
            id,
            state: Mutex::new(State {
                outbox: VecDeque::new(),
                outbox_bytes: 0,
                sink_waker: None,
                inbox: VecDeque::new(),
                inbox_bytes: 0,
                inbox_waker: None,
                receiving: false,
                close: None,
                gone: false,
                idle_since: now,
            }),
            wake_receiver: Notify::new(),
            inbox_room: Notify::new(),
            limit: limit.max(1),
        })
    }

    /// The session id the client chose.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data here.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches a receiving request; false if one is attached already.
    pub fn attach(&self) -> bool {
        let mut s = self.lock();
        if s.receiving {
            return false;
        }
        s.receiving = true;
        true
    }

    /// The receiving request ended normally.
    pub fn detach(&self, now: Instant) {
        let mut s = self.lock();
        s.receiving = false;
        s.idle_since = now;
    }

    /// The receiving request was cut by the network: the session closes
    /// with `1002 Connection interrupted`.
    pub fn interrupt(&self, now: Instant) {
        self.detach(now);
        self.end(INTERRUPTED.0, INTERRUPTED.1);
    }

    /// Closes the client side for good (also on time-out): the close frame
    /// is remembered, the handler's stream ends and its sink fails.
    pub fn end(&self, code: u16, reason: &str) {
        let wakers = {
            let mut s = self.lock();
            if s.close.is_none() {
                s.close = Some((code, reason.to_owned()));
            }
            s.gone = true;
            s.outbox.clear();
            s.outbox_bytes = 0;
            [s.inbox_waker.take(), s.sink_waker.take()]
        };
        wakers.into_iter().flatten().for_each(Waker::wake);
        self.wake_receiver.notify_one();
        self.inbox_room.notify_waiters();
    }

    /// The handler closed the session: the receiver sends the close frame.
    fn handler_close(&self, code: u16, reason: &str) {
        {
            let mut s = self.lock();
            if s.close.is_none() {
                s.close = Some((code, reason.to_owned()));
            }
        }
        self.wake_receiver.notify_one();
    }

    /// What to send next: queued messages first, then the close frame.
    pub fn take(&self) -> Outgoing {
        let (out, waker) = {
            let mut s = self.lock();
            if !s.outbox.is_empty() {
                let v: Vec<String> = s.outbox.drain(..).collect();
                s.outbox_bytes = 0;
                (Outgoing::Messages(v), s.sink_waker.take())
            } else if let Some((code, reason)) = &s.close {
                (Outgoing::Close(*code, reason.clone()), None)
            } else {
                (Outgoing::Nothing, None)
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
        out
    }

    /// Waits until there may be something to [`take`](Session::take).
    /// (Enable the future before calling `take`, so no wake-up is lost.)
    pub fn ready(&self) -> tokio::sync::futures::Notified<'_> {
        self.wake_receiver.notified()
    }

    /// Moves what fits from `pending` into the inbox (at least one message
    /// when the inbox is under its limit); true if the session is gone.
    pub fn offer(&self, pending: &mut VecDeque<String>) -> bool {
        let waker = {
            let mut s = self.lock();
            if s.gone {
                return true;
            }
            let mut moved = false;
            while s.inbox_bytes < self.limit {
                let Some(m) = pending.pop_front() else {
                    break;
                };
                s.inbox_bytes += m.len();
                s.inbox.push_back(m);
                moved = true;
            }
            if moved {
                s.inbox_waker.take()
            } else {
                None
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
        false
    }

    /// Offers `pending` until all of it is in the inbox, waiting for room;
    /// true if the session is gone. Cancel-safe: what was moved is gone
    /// from `pending`.
    pub async fn offer_wait(&self, pending: &mut VecDeque<String>) -> bool {
        loop {
            let room = self.inbox_room.notified();
            tokio::pin!(room);
            // Registered before the check, so no wake-up is lost.
            room.as_mut().enable();
            if self.offer(pending) {
                return true;
            }
            if pending.is_empty() {
                return false;
            }
            room.await;
        }
    }

    /// Queues messages from the client for the handler, waiting while the
    /// inbox is over its limit. False if the session is gone.
    pub async fn deliver(&self, messages: Vec<String>) -> bool {
        let mut pending = VecDeque::from(messages);
        !self.offer_wait(&mut pending).await
    }

    /// Whether no receiving request has been attached for `delay`.
    pub fn expired(&self, now: Instant, delay: Duration) -> bool {
        let s = self.lock();
        !s.receiving && now.saturating_duration_since(s.idle_since) >= delay
    }

    /// The handler's end of this session.
    pub fn conn(self: &Arc<Self>) -> Conn {
        Conn {
            session: self.clone(),
            closed: false,
        }
    }
}

/// The handler's end of a SockJS session: a stream of the client's
/// messages (as WebSocket text messages) and a sink for messages to the
/// client. Sending `Message::Close(Some(frame))` closes the session with
/// that code and reason; text and binary messages are sent as text
/// (binary lossily as UTF-8, since SockJS carries JSON strings). Dropping
/// it closes the session with `1000 Normal closure`.
#[derive(Debug)]
pub struct Conn {
    session: Arc<Session>,
    closed: bool,
}

impl Conn {
    /// The SockJS session id.
    pub fn id(&self) -> &str {
        self.session.id()
    }

    /// Closes the session with `code` and `reason`.
    pub fn close(&mut self, code: u16, reason: &str) {
        self.closed = true;
        self.session.handler_close(code, reason);
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if !self.closed {
            self.session.handler_close(NORMAL.0, NORMAL.1);
        }
    }
}

impl Stream for Conn {
    type Item = Result<Message, WsError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let session = &self.session;
        let msg = {
            let mut s = session.lock();
            match s.inbox.pop_front() {
                Some(m) => {
                    s.inbox_bytes -= m.len();
                    Some(m)
                }
                None if s.gone => return Poll::Ready(None),
                None => {
                    s.inbox_waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
        };
        session.inbox_room.notify_waiters();
        Poll::Ready(msg.map(|m| Ok(Message::Text(m.into()))))
    }
}

impl Sink<Message> for Conn {
    type Error = WsError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let mut s = self.session.lock();
        if s.gone {
            return Poll::Ready(Err(WsError::ConnectionClosed));
        }
        if s.outbox_bytes >= self.session.limit {
            s.sink_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(mut self: Pin<&mut Self>, msg: Message) -> Result<(), WsError> {
        let text = match msg {
            Message::Text(t) => t.as_str().to_owned(),
            Message::Binary(b) => String::from_utf8_lossy(&b).into_owned(),
            Message::Close(frame) => {
                let (code, reason) = frame
                    .map(|f| (u16::from(f.code), f.reason.as_str().to_owned()))
                    .unwrap_or((NORMAL.0, NORMAL.1.to_owned()));
                self.close(code, &reason);
                return Ok(());
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Ok(()),
        };
        {
            let mut s = self.session.lock();
            if s.gone {
                return Err(WsError::ConnectionClosed);
            }
            s.outbox_bytes += text.len();
            s.outbox.push_back(text);
        }
        self.session.wake_receiver.notify_one();
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        if !self.closed {
            self.close(NORMAL.0, NORMAL.1);
        }
        Poll::Ready(Ok(()))
    }
}

/// The live HTTP-transport sessions of one endpoint, by session id.
#[derive(Debug, Default)]
pub struct Table {
    sessions: Mutex<HashMap<String, Arc<Session>>>,
}

impl Table {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The session `id`, if live.
    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.lock().get(id).cloned()
    }

    /// The session `id`, or a new one from `create` (true when new).
    /// `create` may refuse (the connection limit): then nothing is added.
    pub fn get_or_create<E>(
        &self,
        id: &str,
        create: impl FnOnce() -> Result<Arc<Session>, E>,
    ) -> Result<(Arc<Session>, bool), E> {
        let mut t = self.lock();
        if let Some(s) = t.get(id) {
            return Ok((s.clone(), false));
        }
        let s = create()?;
        t.insert(id.to_owned(), s.clone());
        Ok((s, true))
    }

    /// Removes and ends the sessions idle for `delay`; returns how many.
    pub fn sweep(&self, now: Instant, delay: Duration) -> usize {
        let expired: Vec<Arc<Session>> = {
            let mut t = self.lock();
            let ids: Vec<String> = t
                .iter()
                .filter(|(_, s)| s.expired(now, delay))
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter().filter_map(|id| t.remove(id)).collect()
        };
        for s in &expired {
            s.end(INTERRUPTED.0, "Session timed out");
        }
        expired.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;

    #[tokio::test]
    async fn messages_flow_both_ways() {
        let t0 = Instant::now();
        let s = Session::new("s1".into(), 1024, t0);
        let mut conn = s.conn();
        assert!(s.deliver(vec!["a".into(), "b".into()]).await);
        assert_eq!(
            conn.next().await.and_then(Result::ok),
            Some(Message::Text("a".into()))
        );
        assert_eq!(
            conn.next().await.and_then(Result::ok),
            Some(Message::Text("b".into()))
        );
        assert_eq!(s.take(), Outgoing::Nothing);
        conn.send(Message::Text("x".into())).await.expect("send");
        conn.send(Message::Text("y".into())).await.expect("send");
        assert_eq!(s.take(), Outgoing::Messages(vec!["x".into(), "y".into()]));
        conn.send(Message::Close(Some(CloseFrame {
            code: 3000.into(),
            reason: "Go away!".into(),
        })))
        .await
        .expect("close");
        assert_eq!(s.take(), Outgoing::Close(3000, "Go away!".into()));
        // The close frame is served again and again.
        assert_eq!(s.take(), Outgoing::Close(3000, "Go away!".into()));
    }

    #[tokio::test]
    async fn one_receiver_at_a_time() {
        let s = Session::new("s".into(), 1024, Instant::now());
        assert!(s.attach());
        assert!(!s.attach());
        s.detach(Instant::now());
        assert!(s.attach());
    }

    #[tokio::test]
    async fn full_outbox_holds_the_sender_back() {
        let s = Session::new("s".into(), 4, Instant::now());
        let mut conn = s.conn();
        conn.send(Message::Text("12345".into()))
            .await
            .expect("send");
        // Over the limit: the next send waits until a receiver takes.
        let blocked = tokio::time::timeout(
            Duration::from_millis(50),
            conn.send(Message::Text("z".into())),
        )
        .await;
        assert!(blocked.is_err());
        assert_eq!(s.take(), Outgoing::Messages(vec!["12345".into()]));
        conn.send(Message::Text("z".into()))
            .await
            .expect("room now");
    }

    #[tokio::test]
    async fn full_inbox_holds_the_client_back() {
        let s = Session::new("s".into(), 4, Instant::now());
        let mut conn = s.conn();
        assert!(s.deliver(vec!["12345".into()]).await);
        let s2 = s.clone();
        let second = tokio::spawn(async move { s2.deliver(vec!["6".into()]).await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!second.is_finished());
        assert!(conn.next().await.is_some());
        assert!(second.await.expect("join"));
    }

    #[tokio::test]
    async fn idle_sessions_time_out_and_end() {
        let t0 = Instant::now();
        let table = Table::default();
        let (s, new) = table
            .get_or_create::<()>("a", || Ok(Session::new("a".into(), 16, t0)))
            .expect("create");
        assert!(new);
        let mut conn = s.conn();
        let delay = Duration::from_secs(5);
        assert!(s.attach());
        // Attached receivers keep it alive however long.
        assert_eq!(table.sweep(t0 + Duration::from_secs(60), delay), 0);
        s.detach(t0 + Duration::from_secs(60));
        assert_eq!(table.sweep(t0 + Duration::from_secs(64), delay), 0);
        assert_eq!(table.sweep(t0 + Duration::from_secs(65), delay), 1);
        assert!(table.get("a").is_none());
        // The handler sees the end and can no longer send.
        assert!(conn.next().await.is_none());
        assert!(conn.send(Message::Text("x".into())).await.is_err());
    }

    #[tokio::test]
    async fn interrupted_session_serves_1002() {
        let s = Session::new("s".into(), 16, Instant::now());
        let mut conn = s.conn();
        assert!(s.attach());
        s.interrupt(Instant::now());
        assert_eq!(
            s.take(),
            Outgoing::Close(1002, "Connection interrupted".into())
        );
        assert!(conn.next().await.is_none());
    }

    #[tokio::test]
    async fn dropping_the_conn_closes_normally() {
        let s = Session::new("s".into(), 16, Instant::now());
        drop(s.conn());
        assert_eq!(s.take(), Outgoing::Close(1000, "Normal closure".into()));
    }
}
