//! Cluster-level harness (tests/tests/cluster.rs): several gateway processes
//! under the test's control, the two-node RabbitMQ test cluster, and clients
//! that reconnect and account for every message.
//!
//! - [`Pod`]: one `stomp-gateway` process from a [`GatewayBuilder`], with
//!   signals (SIGTERM, SIGKILL), its exit status, the `/readyz` details and a
//!   restart on the same ports (so the clients' URL lists stay valid). Its
//!   log is `target/e2e-logs/<name>-<random>.log` (all starts appended),
//!   printed when a test fails, removed when it passes unless
//!   `E2E_KEEP_LOGS` is set.
//! - [`TestNode`], [`test_cluster`]: the nodes started by
//!   `scripts/rabbitmq-test-cluster.sh` (`sgw-a@localhost`: AMQP 5681, STOMP
//!   61681; `sgw-b@localhost`: AMQP 5682, STOMP 61682), `rabbitmqctl
//!   stop_app`/`start_app`, and an [`AppGuard`] that starts a stopped node
//!   application again when a test fails half-way. The main node
//!   (`rabbit@localhost`) is never stopped.
//! - [`run_publisher`], [`run_consumer`]: a publisher that sends messages
//!   with receipts and resends whatever was not receipted after a reconnect,
//!   and a consumer with `client-individual` acks; both reconnect round
//!   robin over the gateways and log how every connection ended
//!   ([`ConnLog`]). A [`Tally`] counts deliveries per message id, so a test
//!   can check that every receipted id arrived and report duplicates.
//! - AMQP against any node: [`crate::amqp::Amqp::connect_url`].

use crate::gateway::{free_port, gateway_bin, log_dir, tail, GatewayBuilder, READY_TIMEOUT};
use crate::stomp::{show, StompClient, ALL_SUBPROTOCOLS};
use crate::{http, Command as StompCommand, Frame, Version};
use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// What a cluster test says when the test cluster is not there.
pub const CLUSTER_HINT: &str =
    "the RabbitMQ test cluster (sgw-a@localhost + sgw-b@localhost) is not running: \
     run `scripts/rabbitmq-test-cluster.sh start` first (scripts/test.sh does it), \
     then `cargo test -p e2e --test cluster -- --ignored --test-threads=1`";

// ---------------------------------------------------------------------------
// Gateway processes

/// One gateway process; killed on drop.
#[derive(Debug)]
pub struct Pod {
    name: String,
    env: Vec<(String, String)>,
    port: u16,
    admin_port: u16,
    child: Option<Child>,
    status: Option<ExitStatus>,
    config_path: PathBuf,
    log_path: PathBuf,
    starts: u32,
    keep: AtomicBool,
}

impl Pod {
    /// Starts `stomp-gateway` with `builder`'s config (plus `listen` and
    /// `admin_listen` on free ports) and `env`, and waits until `/readyz`
    /// answers 200.
    pub async fn start(name: &str, builder: &GatewayBuilder, env: &[(&str, &str)]) -> Pod {
        let mut last = String::new();
        for _attempt in 0..3 {
            let mut pod = Pod::spawn_new(name, builder, env);
            match pod.wait_ready(true, READY_TIMEOUT).await {
                Ok(_) => return pod,
                Err(e) => {
                    let log = pod.log();
                    if pod.exit_status().is_some() && log.to_ascii_lowercase().contains("in use") {
                        last = format!("{e:#}");
                        continue;
                    }
                    pod.keep();
                    panic!(
                        "pod `{name}` did not become ready: {e:#}\nconfig {}:\n{}\nlog {}:\n{}",
                        pod.config_path.display(),
                        fs::read_to_string(&pod.config_path).unwrap_or_default(),
                        pod.log_path.display(),
                        tail(&log, 60)
                    );
                }
            }
        }
        panic!("pod `{name}` could not bind free ports: {last}");
    }

    fn spawn_new(name: &str, builder: &GatewayBuilder, env: &[(&str, &str)]) -> Pod {
        let (port, admin_port) = (free_port(), free_port());
        let stem = format!("{name}-{:08x}", rand::random::<u32>());
        let dir = log_dir();
        let config_path = dir.join(format!("{stem}.toml"));
        let log_path = dir.join(format!("{stem}.log"));
        fs::write(&config_path, builder.render(port, admin_port)).expect("write pod config");
        let mut pod = Pod {
            name: name.to_owned(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            port,
            admin_port,
            child: None,
            status: None,
            config_path,
            log_path,
            starts: 0,
            keep: AtomicBool::new(false),
        };
        pod.spawn().expect("spawn stomp-gateway");
        pod
    }

    fn spawn(&mut self) -> Result<()> {
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .context("open pod log")?;
        writeln!(log, "==== e2e: start #{} of pod {}", self.starts, self.name)?;
        let mut cmd = Command::new(gateway_bin());
        cmd.arg("--config")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("GATEWAY__") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        self.child = Some(cmd.spawn().context("spawn stomp-gateway")?);
        self.status = None;
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ws://127.0.0.1:<port>/ws` (the same across restarts).
    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// `127.0.0.1:<admin port>`.
    pub fn admin_addr(&self) -> String {
        format!("127.0.0.1:{}", self.admin_port)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_path(&self) -> &std::path::Path {
        &self.log_path
    }

    /// Keep the log and config files after the test (a failure).
    pub fn keep(&self) {
        self.keep.store(true, Ordering::Relaxed);
    }

    /// The exit status once the process has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(s)) = child.try_wait() {
                    self.status = Some(s);
                }
            }
        }
        self.status
    }

    /// Whether the process is running.
    pub fn running(&mut self) -> bool {
        self.child.is_some() && self.exit_status().is_none()
    }

    /// Sends `signal` to the running process.
    pub fn signal(&mut self, signal: Signal) -> Result<()> {
        if !self.running() {
            bail!("pod `{}` is not running ({:?})", self.name, self.status);
        }
        let pid = self
            .child
            .as_ref()
            .map(Child::id)
            .ok_or_else(|| anyhow!("no process"))?;
        let pid = i32::try_from(pid).context("pid")?;
        kill(Pid::from_raw(pid), signal).with_context(|| format!("kill -{signal} {pid}"))
    }

    /// Waits up to `timeout` for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exit_status() {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                bail!("pod `{}` still running after {timeout:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill(&mut self) -> Result<ExitStatus> {
        self.signal(Signal::SIGKILL)?;
        self.wait_exit(Duration::from_secs(5)).await
    }

    /// Starts the process again on the same ports (after it exited) and
    /// waits until it is ready.
    pub async fn restart(&mut self) -> Result<()> {
        if self.running() {
            bail!("pod `{}` is still running", self.name);
        }
        self.spawn()?;
        self.wait_ready(true, READY_TIMEOUT).await.map(|_| ())
    }

    /// `GET /readyz`: the status and the JSON details.
    pub async fn readyz(&self) -> Result<(u16, Value)> {
        let r = http::request_async("GET", self.admin_addr(), "/readyz".into(), None, None).await?;
        let v: Value = serde_json::from_str(&r.body)
            .with_context(|| format!("/readyz body is not JSON: {:?}", r.body))?;
        Ok((r.status, v))
    }

    /// The HTTP status of `GET <path>` on the admin listener.
    pub async fn admin_get_status(&self, path: &str) -> Result<u16> {
        let r = http::request_async("GET", self.admin_addr(), path.to_owned(), None, None).await?;
        Ok(r.status)
    }

    /// Polls `/readyz` until its `ready` is `want` (200 or 503 to match);
    /// returns the details. Fails when the process exits.
    pub async fn wait_ready(&mut self, want: bool, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no answer yet");
        loop {
            if let Some(s) = self.exit_status() {
                bail!(
                    "pod `{}` exited with {} (last /readyz: {last})",
                    self.name,
                    describe_status(s)
                );
            }
            match self.readyz().await {
                Ok((status, v)) => {
                    if v["ready"].as_bool() == Some(want) && (status == 200) == want {
                        return Ok(v);
                    }
                    last = format!("HTTP {status} {v}");
                }
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() >= deadline {
                bail!(
                    "pod `{}`: /readyz not {} after {timeout:?} (last: {last})",
                    self.name,
                    if want { "ready" } else { "unready" }
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the log contains `needle` (log lines are written as they
    /// happen); returns the matching line.
    pub async fn wait_log_line(
        &self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.log().lines().find(|l| pred(l)) {
                return Ok(l.to_owned());
            }
            if Instant::now() >= deadline {
                bail!(
                    "pod `{}`: no matching log line within {timeout:?}; last lines:\n{}",
                    self.name,
                    tail(&self.log(), 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if self.status.is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() || self.keep.load(Ordering::Relaxed) {
            eprintln!(
                "---- pod `{}` log: {} (config {}); last lines:\n{}",
                self.name,
                self.log_path.display(),
                self.config_path.display(),
                tail(&self.log(), 40)
            );
        } else if std::env::var_os("E2E_KEEP_LOGS").is_none() {
            let _ = fs::remove_file(&self.log_path);
            let _ = fs::remove_file(&self.config_path);
        }
    }
}

/// "exit code 0", "signal 9 (SIGKILL)".
pub fn describe_status(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(n) => format!("signal {sig} ({n})"),
            Err(_) => format!("signal {sig}"),
        },
        _ => format!("{s}"),
    }
}

/// Passes `result` through; on an error, marks every pod's log to be kept
/// and printed (the harness prints logs on panics only).
pub fn keep_logs_on_error<T>(pods: &[&Pod], result: Result<T>) -> Result<T> {
    if result.is_err() {
        for p in pods {
            p.keep();
        }
    }
    result
}

// ---------------------------------------------------------------------------
// The RabbitMQ test cluster

/// A node of the test cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestNode {
    pub name: &'static str,
    pub amqp_port: u16,
    pub stomp_port: u16,
}

/// First node; `amqp.url` and the first broker address of the cluster tests.
pub const NODE_A: TestNode = TestNode {
    name: "sgw-a@localhost",
    amqp_port: 5681,
    stomp_port: 61681,
};

/// Second node, clustered with [`NODE_A`].
pub const NODE_B: TestNode = TestNode {
    name: "sgw-b@localhost",
    amqp_port: 5682,
    stomp_port: 61682,
};

fn port_open(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

impl TestNode {
    /// `127.0.0.1:<STOMP port>`.
    pub fn stomp_address(&self) -> String {
        format!("127.0.0.1:{}", self.stomp_port)
    }

    /// `amqp://guest:guest@127.0.0.1:<AMQP port>/%2f`.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    /// Whether the STOMP listener accepts connections.
    pub fn stomp_open(&self) -> bool {
        port_open(self.stomp_port)
    }

    /// `rabbitmqctl -n <node> -q <args>`; its stdout.
    pub async fn ctl(&self, args: &[&str]) -> Result<String> {
        let out = tokio::process::Command::new("rabbitmqctl")
            .args(["-n", self.name, "-q"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .context("running rabbitmqctl")?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "rabbitmqctl -n {} {}: {} {}",
                self.name,
                args.join(" "),
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(stdout)
    }

    /// Whether the node answers and its RabbitMQ application runs
    /// (`None`: the node itself does not answer).
    pub async fn app_running(&self) -> Option<bool> {
        match self.ctl(&["eval", "rabbit:is_running()."]).await {
            Ok(s) => Some(s.trim() == "true"),
            Err(_) => None,
        }
    }

    /// `rabbitmqctl stop_app`; the returned guard starts the application
    /// again if the test ends (or fails) without [`AppGuard::start`].
    pub async fn stop_app(&self) -> Result<AppGuard> {
        let guard = AppGuard {
            node: *self,
            armed: true,
        };
        self.ctl(&["stop_app"]).await?;
        Ok(guard)
    }

    /// `rabbitmqctl start_app`, then waits for the STOMP and AMQP ports.
    pub async fn start_app(&self) -> Result<()> {
        self.ctl(&["start_app"]).await?;
        self.wait_ports(Duration::from_secs(30)).await
    }

    async fn wait_ports(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !(port_open(self.stomp_port) && port_open(self.amqp_port)) {
            if Instant::now() >= deadline {
                bail!(
                    "{}: STOMP {} / AMQP {} not open after {timeout:?}",
                    self.name,
                    self.stomp_port,
                    self.amqp_port
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// AMQP connections on this node's listener whose client properties
    /// mention `needle` (for example a `POD_NAME`), from `rabbitmqctl
    /// list_connections` (which lists the whole cluster's AMQP
    /// connections): the server port of each.
    pub async fn amqp_connection_ports(&self, needle: &str) -> Result<Vec<u16>> {
        let out = self
            .ctl(&[
                "list_connections",
                "--no-table-headers",
                "port",
                "client_properties",
            ])
            .await?;
        Ok(out
            .lines()
            .filter(|l| l.contains(needle))
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect())
    }
}

/// Starts a stopped node application again on drop (blocking), unless
/// [`AppGuard::start`] did already.
#[derive(Debug)]
pub struct AppGuard {
    node: TestNode,
    armed: bool,
}

impl AppGuard {
    /// `start_app` now and wait for the ports.
    pub async fn start(mut self) -> Result<()> {
        self.armed = false;
        self.node.start_app().await
    }
}

impl Drop for AppGuard {
    fn drop(&mut self) {
        if self.armed {
            eprintln!(
                "restarting the application of {} (the test did not)",
                self.node.name
            );
            let r = Command::new("rabbitmqctl")
                .args(["-n", self.node.name, "-q", "start_app"])
                .stdin(Stdio::null())
                .status();
            if !matches!(r, Ok(s) if s.success()) {
                eprintln!("rabbitmqctl -n {} start_app failed: {r:?}", self.node.name);
            }
        }
    }
}

/// Checks that the test cluster is up (both nodes' STOMP and AMQP ports
/// answer, `sgw-b` runs clustered with `sgw-a`), starting a node application
/// that an earlier, failed run left stopped. Panics with [`CLUSTER_HINT`]
/// when the nodes are not there.
pub async fn test_cluster() -> (TestNode, TestNode) {
    for node in [NODE_A, NODE_B] {
        if node.stomp_open() && port_open(node.amqp_port) {
            continue;
        }
        match node.app_running().await {
            None => panic!("{}: node does not answer. {CLUSTER_HINT}", node.name),
            Some(false) => {
                eprintln!("{}: application stopped; starting it", node.name);
                if let Err(e) = node.start_app().await {
                    panic!("{}: start_app failed: {e:#}. {CLUSTER_HINT}", node.name);
                }
            }
            Some(true) => {
                if let Err(e) = node.wait_ports(Duration::from_secs(20)).await {
                    panic!("{e:#}. {CLUSTER_HINT}");
                }
            }
        }
    }
    let expr = format!(
        "lists:member('{}', rabbit_mnesia:cluster_nodes(running)).",
        NODE_A.name
    );
    match NODE_B.ctl(&["eval", &expr]).await {
        Ok(s) if s.trim() == "true" => {}
        Ok(s) => panic!(
            "{} does not see {} running in its cluster ({}). {CLUSTER_HINT}",
            NODE_B.name,
            NODE_A.name,
            s.trim()
        ),
        Err(e) => panic!("{e:#}. {CLUSTER_HINT}"),
    }
    (NODE_A, NODE_B)
}

// ---------------------------------------------------------------------------
// AMQP on any node

// ---------------------------------------------------------------------------
// Reconnecting clients

/// A stop signal shared with client tasks.
#[derive(Debug, Clone, Default)]
pub struct Flag(Arc<AtomicBool>);

impl Flag {
    pub fn new() -> Flag {
        Flag::default()
    }
    pub fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Deliveries per message id, shared by consumers.
#[derive(Debug, Clone, Default)]
pub struct Tally(Arc<Mutex<BTreeMap<String, u32>>>);

impl Tally {
    pub fn new() -> Tally {
        Tally::default()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u32>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn add(&self, id: &str) {
        *self.map().entry(id.to_owned()).or_insert(0) += 1;
    }

    pub fn snapshot(&self) -> BTreeMap<String, u32> {
        self.map().clone()
    }

    /// Ids of `expected` not delivered yet.
    pub fn missing(&self, expected: &BTreeSet<String>) -> Vec<String> {
        let m = self.map();
        expected
            .iter()
            .filter(|id| !m.contains_key(*id))
            .cloned()
            .collect()
    }

    /// (ids delivered more than once, extra deliveries).
    pub fn duplicates(&self) -> (usize, u32) {
        let m = self.map();
        let ids = m.values().filter(|n| **n > 1).count();
        let extra = m.values().map(|n| n.saturating_sub(1)).sum();
        (ids, extra)
    }

    /// Waits until every id of `expected` was delivered.
    pub async fn wait_covers(&self, expected: &BTreeSet<String>, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let missing = self.missing(expected);
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} of {} receipted message(s) never delivered within {timeout:?}: {}",
                    missing.len(),
                    expected.len(),
                    abbreviate(&missing, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The first `n` items, then "... and N more".
pub fn abbreviate(items: &[String], n: usize) -> String {
    let mut s = items.iter().take(n).cloned().collect::<Vec<_>>().join(", ");
    if items.len() > n {
        let _ = write!(s, " ... and {} more", items.len() - n);
    }
    s
}

/// One client connection: where it went and how it ended.
#[derive(Debug, Clone)]
pub struct ConnLog {
    /// Index of the gateway URL it connected to.
    pub target: usize,
    /// The CONNECTED `session` header.
    pub session: String,
    pub opened: Instant,
    /// When the ERROR arrived, if one did.
    pub error_at: Option<Instant>,
    /// The ERROR's `message` header.
    pub error: Option<String>,
    /// Frames received after the ERROR (before the close).
    pub frames_after_error: usize,
    /// When the connection was seen closed.
    pub closed_at: Option<Instant>,
    /// The WebSocket close code, if a close frame came.
    pub close_code: Option<u16>,
    /// How it ended, in words.
    pub end: String,
    /// Publishers: messages sent without a RECEIPT when it ended.
    pub unreceipted_at_end: usize,
}

impl ConnLog {
    fn new(target: usize, connected: &Frame) -> ConnLog {
        ConnLog {
            target,
            session: connected.header("session").unwrap_or("?").to_owned(),
            opened: Instant::now(),
            error_at: None,
            error: None,
            frames_after_error: 0,
            closed_at: None,
            close_code: None,
            end: String::from("open"),
            unreceipted_at_end: 0,
        }
    }

    /// Whether it was open on gateway `target` at `t`.
    pub fn open_on_at(&self, target: usize, t: Instant) -> bool {
        self.target == target && self.opened < t && self.closed_at.is_none_or(|c| c > t)
    }

    /// One line for reports; times relative to `t0`.
    pub fn describe(&self, t0: Instant) -> String {
        let rel = |t: Instant| {
            if t >= t0 {
                format!("+{}ms", t.duration_since(t0).as_millis())
            } else {
                format!("-{}ms", t0.duration_since(t).as_millis())
            }
        };
        let mut s = format!(
            "gw{} session {} opened {}",
            self.target,
            self.session,
            rel(self.opened)
        );
        if let (Some(at), Some(m)) = (self.error_at, &self.error) {
            let _ = write!(s, ", ERROR {m:?} {}", rel(at));
        }
        if let Some(at) = self.closed_at {
            let _ = write!(s, ", closed {} code {:?}", rel(at), self.close_code);
        }
        if self.frames_after_error > 0 {
            let _ = write!(s, ", {} frame(s) after the ERROR", self.frames_after_error);
        }
        if self.unreceipted_at_end > 0 {
            let _ = write!(s, ", {} unreceipted", self.unreceipted_at_end);
        }
        let _ = write!(s, " [{}]", self.end);
        s
    }
}

/// Connects to `urls[start]`, else the next ones round robin, until
/// `deadline`: WebSocket, STOMP 1.2 CONNECT without heart-beats. Returns the
/// client, the index it reached, the CONNECTED frame and the failed
/// attempts.
pub async fn connect_any(
    urls: &[String],
    start: usize,
    deadline: Instant,
) -> Result<(StompClient, usize, Frame, Vec<String>)> {
    let mut failures = Vec::new();
    let mut attempt = 0usize;
    loop {
        let idx = (start + attempt) % urls.len();
        let url = &urls[idx];
        let r = tokio::time::timeout(Duration::from_secs(5), async {
            let mut c = StompClient::connect_ws(url, &ALL_SUBPROTOCOLS).await?;
            let f = c.connect_stomp(Version::V1_2, None, None, (0, 0)).await?;
            Ok::<_, anyhow::Error>((c, f))
        })
        .await;
        match r {
            Ok(Ok((c, f))) => return Ok((c, idx, f, failures)),
            Ok(Err(e)) => failures.push(format!("gw{idx}: {e:#}")),
            Err(_) => failures.push(format!("gw{idx}: CONNECT timed out")),
        }
        attempt += 1;
        if Instant::now() >= deadline {
            bail!(
                "no gateway accepted a session before the deadline: {}",
                abbreviate(&failures, 10)
            );
        }
        // A short pause between gateways, a longer one after a full round.
        let pause = if attempt % urls.len() == 0 { 200 } else { 20 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// Reads the rest of a connection that got an ERROR (`error`) or failed
/// (`cause`): the frames after the ERROR and the close code.
async fn finish(c: &mut StompClient, error: Option<Frame>, cause: &str, log: &mut ConnLog) {
    let now = Instant::now();
    let mut error = error;
    if error.is_some() {
        log.error_at = Some(now);
    }
    match c.expect_close(Duration::from_secs(5)).await {
        Ok(closed) => {
            log.closed_at = Some(Instant::now());
            log.close_code = closed.code;
            for f in closed.frames {
                if error.is_none() && f.command == StompCommand::Error {
                    log.error_at = Some(now);
                    error = Some(f);
                } else if error.is_some() {
                    log.frames_after_error += 1;
                }
            }
            log.end = format!("{cause}; close {:?} {:?}", closed.code, closed.reason);
        }
        Err(e) => {
            log.closed_at = Some(Instant::now());
            log.end = format!("{cause}; no close within 5s: {e:#}");
        }
    }
    log.error = error.map(|f| f.header("message").unwrap_or("").to_owned());
}

/// A publisher's settings.
#[derive(Debug, Clone)]
pub struct PublisherSpec {
    /// Prefix of its message ids (`<name>-<n>`), unique per publisher.
    pub name: String,
    pub destination: String,
    /// Extra SEND headers (`persistent`, `durable`, ...).
    pub headers: Vec<(String, String)>,
    /// `burst` SENDs per interval.
    pub interval: Duration,
    pub burst: usize,
    /// Most messages awaiting a RECEIPT.
    pub max_inflight: usize,
    /// Index of the gateway to connect to first.
    pub start_target: usize,
}

/// What a publisher did.
#[derive(Debug, Clone, Default)]
pub struct PublisherReport {
    pub name: String,
    /// Distinct messages created.
    pub created: usize,
    /// SEND frames written (first sends and resends).
    pub frames_sent: usize,
    /// SENDs of ids already sent on an earlier connection.
    pub resent: usize,
    pub receipted: BTreeSet<String>,
    /// Sent but never receipted (the deadline came first).
    pub unreceipted: BTreeSet<String>,
    pub conns: Vec<ConnLog>,
    pub connect_failures: usize,
    pub error: Option<String>,
}

/// Sends messages (`x-id: <name>-<n>`, body the same, a `receipt`) to
/// `spec.destination`, `spec.burst` per `spec.interval` (in one WebSocket
/// message, at most `spec.max_inflight` unreceipted), until `stop` is set; then
/// waits for the outstanding receipts. Whatever was not receipted when a
/// connection ended is sent again on the next connection. Returns when
/// every message is receipted, or at `deadline`.
pub async fn run_publisher(
    urls: Arc<Vec<String>>,
    spec: PublisherSpec,
    stop: Flag,
    deadline: Instant,
) -> PublisherReport {
    let mut r = PublisherReport {
        name: spec.name.clone(),
        ..PublisherReport::default()
    };
    let mut pending: BTreeSet<u64> = BTreeSet::new();
    let mut next: u64 = 0;
    let mut target = spec.start_target;
    let id_of = |n: u64| format!("{}-{n}", spec.name);
    let frame_of = |n: u64| {
        let id = id_of(n);
        let mut f = Frame::new(StompCommand::Send)
            .with_header("destination", spec.destination.as_str())
            .with_header("content-type", "text/plain")
            .with_header("x-id", id.as_str())
            .with_header("receipt", format!("rcpt-{n}"));
        for (k, v) in &spec.headers {
            f = f.with_header(k.as_str(), v.as_str());
        }
        f.with_body(Bytes::from(id))
    };
    loop {
        if (stop.is_set() && pending.is_empty()) || Instant::now() >= deadline {
            break;
        }
        let (mut c, idx, connected, failures) = match connect_any(&urls, target, deadline).await {
            Ok(x) => x,
            Err(e) => {
                r.error = Some(format!("{e:#}"));
                break;
            }
        };
        r.connect_failures += failures.len();
        target = idx + 1;
        let mut log = ConnLog::new(idx, &connected);
        let mut resend: VecDeque<u64> = pending.iter().copied().collect();
        let mut next_send = tokio::time::Instant::now();
        let mut finished = false;
        loop {
            if stop.is_set() && pending.is_empty() {
                log.closed_at = Some(Instant::now());
                log.end = match tokio::time::timeout(crate::WAIT, c.disconnect()).await {
                    Ok(Ok(())) => "done: DISCONNECT receipted".into(),
                    Ok(Err(e)) => format!("done; DISCONNECT failed: {e:#}"),
                    Err(_) => "done; DISCONNECT timed out".into(),
                };
                finished = true;
                break;
            }
            if Instant::now() >= deadline {
                log.end = "deadline".into();
                break;
            }
            let now = tokio::time::Instant::now();
            if now >= next_send {
                let mut batch = Vec::new();
                while batch.len() < spec.burst.max(1) {
                    if let Some(n) = resend.pop_front() {
                        r.resent += 1;
                        batch.push(n);
                    } else if !stop.is_set() && pending.len() < spec.max_inflight {
                        batch.push(next);
                        pending.insert(next);
                        next += 1;
                    } else {
                        break;
                    }
                }
                if !batch.is_empty() {
                    let frames: Vec<Frame> = batch.iter().map(|n| frame_of(*n)).collect();
                    // One WebSocket message per burst, as a busy browser
                    // client would batch them.
                    if let Err(e) = c.send_frames_in_one_message(&frames).await {
                        finish(&mut c, None, &format!("SEND failed: {e:#}"), &mut log).await;
                        break;
                    }
                    r.frames_sent += frames.len();
                }
                next_send = now + spec.interval;
            }
            let wait = next_send
                .saturating_duration_since(tokio::time::Instant::now())
                .max(Duration::from_millis(1));
            match c.recv_opt(wait).await {
                Ok(None) => {}
                Ok(Some(got)) => match got.frame.command {
                    StompCommand::Receipt => {
                        let n = got
                            .frame
                            .header("receipt-id")
                            .and_then(|v| v.strip_prefix("rcpt-"))
                            .and_then(|v| v.parse::<u64>().ok());
                        if let Some(n) = n {
                            if pending.remove(&n) {
                                r.receipted.insert(id_of(n));
                            }
                        }
                    }
                    StompCommand::Error => {
                        finish(&mut c, Some(got.frame), "ERROR", &mut log).await;
                        break;
                    }
                    _ => {}
                },
                Err(e) => {
                    finish(&mut c, None, &format!("{e:#}"), &mut log).await;
                    break;
                }
            }
        }
        log.unreceipted_at_end = pending.len();
        r.conns.push(log);
        if finished {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    r.created = usize::try_from(next).unwrap_or(usize::MAX);
    r.unreceipted = pending.iter().map(|n| id_of(*n)).collect();
    r
}

/// A consumer's settings.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub name: String,
    pub destination: String,
    /// Extra SUBSCRIBE headers; `ack: client-individual` is always set.
    pub headers: Vec<(String, String)>,
    pub start_target: usize,
}

/// What a consumer did.
#[derive(Debug, Clone, Default)]
pub struct ConsumerReport {
    pub name: String,
    pub deliveries: usize,
    pub conns: Vec<ConnLog>,
    pub connect_failures: usize,
    pub error: Option<String>,
}

/// Subscribes to `spec.destination` with `client-individual` acks, counts
/// every MESSAGE in `tally` (by `x-id`) and ACKs it; reconnects and
/// subscribes again whenever the connection ends, until `stop` is set (then
/// DISCONNECTs) or `deadline`.
pub async fn run_consumer(
    urls: Arc<Vec<String>>,
    spec: ConsumerSpec,
    tally: Tally,
    stop: Flag,
    deadline: Instant,
) -> ConsumerReport {
    let mut r = ConsumerReport {
        name: spec.name.clone(),
        ..ConsumerReport::default()
    };
    let mut target = spec.start_target;
    'outer: while !stop.is_set() && Instant::now() < deadline {
        let (mut c, idx, connected, failures) = match connect_any(&urls, target, deadline).await {
            Ok(x) => x,
            Err(e) => {
                r.error = Some(format!("{e:#}"));
                break;
            }
        };
        r.connect_failures += failures.len();
        target = idx + 1;
        let mut log = ConnLog::new(idx, &connected);
        let mut headers: Vec<(&str, &str)> = vec![("ack", "client-individual")];
        headers.extend(spec.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if let Err(e) = c.subscribe(&spec.destination, "c", &headers).await {
            finish(&mut c, None, &format!("SUBSCRIBE: {e:#}"), &mut log).await;
            r.conns.push(log);
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        loop {
            if stop.is_set() || Instant::now() >= deadline {
                log.closed_at = Some(Instant::now());
                log.end = match tokio::time::timeout(crate::WAIT, c.disconnect()).await {
                    Ok(Ok(())) => "done: DISCONNECT receipted".into(),
                    Ok(Err(e)) => format!("done; DISCONNECT failed: {e:#}"),
                    Err(_) => "done; DISCONNECT timed out".into(),
                };
                r.conns.push(log);
                break 'outer;
            }
            match c.recv_opt(Duration::from_millis(100)).await {
                Ok(None) => {}
                Ok(Some(got)) => match got.frame.command {
                    StompCommand::Message => {
                        r.deliveries += 1;
                        let f = got.frame;
                        let id = f
                            .header("x-id")
                            .map(str::to_owned)
                            .unwrap_or_else(|| crate::body_text(&f));
                        tally.add(&id);
                        if let Some(ack) = f.header("ack") {
                            let ack = Frame::new(StompCommand::Ack).with_header("id", ack);
                            if let Err(e) = c.send_frame(&ack).await {
                                finish(&mut c, None, &format!("ACK failed: {e:#}"), &mut log).await;
                                break;
                            }
                        }
                    }
                    StompCommand::Error => {
                        finish(&mut c, Some(got.frame), "ERROR", &mut log).await;
                        break;
                    }
                    _ => {}
                },
                Err(e) => {
                    finish(&mut c, None, &format!("{e:#}"), &mut log).await;
                    break;
                }
            }
        }
        r.conns.push(log);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    r
}

/// A session that subscribes to `destination` on `urls[target]` and then
/// only listens until the connection ends (or `timeout`); returns its log.
pub async fn idle_session(
    url: String,
    target: usize,
    destination: String,
    ready: tokio::sync::mpsc::Sender<()>,
    timeout: Duration,
) -> Result<ConnLog> {
    let (mut c, _, connected, _) =
        connect_any(std::slice::from_ref(&url), 0, Instant::now() + crate::WAIT).await?;
    let mut log = ConnLog::new(target, &connected);
    c.subscribe(&destination, "idle", &[]).await?;
    let _ = ready.send(()).await;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.recv_opt(left).await {
            Ok(None) => {
                log.end = "still open at the deadline".into();
                return Ok(log);
            }
            Ok(Some(got)) if got.frame.command == StompCommand::Error => {
                finish(&mut c, Some(got.frame), "ERROR", &mut log).await;
                return Ok(log);
            }
            Ok(Some(got)) => {
                log.end = format!("unexpected frame {}", show(&got.frame));
            }
            Err(e) => {
                finish(&mut c, None, &format!("{e:#}"), &mut log).await;
                return Ok(log);
            }
        }
    }
}

/// A multi-line report of publishers, consumers and deliveries; times
/// relative to `t0`.
pub fn report(
    t0: Instant,
    pubs: &[PublisherReport],
    cons: &[ConsumerReport],
    tally: &Tally,
) -> String {
    let mut s = String::new();
    for p in pubs {
        let _ = writeln!(
            s,
            "publisher {}: {} messages, {} SENDs ({} resends), {} receipted, {} unreceipted, {} failed connect attempts{}",
            p.name,
            p.created,
            p.frames_sent,
            p.resent,
            p.receipted.len(),
            p.unreceipted.len(),
            p.connect_failures,
            p.error.as_deref().map(|e| format!(", error: {e}")).unwrap_or_default()
        );
        for c in &p.conns {
            let _ = writeln!(s, "  {}", c.describe(t0));
        }
    }
    for c in cons {
        let _ = writeln!(
            s,
            "consumer {}: {} deliveries, {} failed connect attempts{}",
            c.name,
            c.deliveries,
            c.connect_failures,
            c.error
                .as_deref()
                .map(|e| format!(", error: {e}"))
                .unwrap_or_default()
        );
        for l in &c.conns {
            let _ = writeln!(s, "  {}", l.describe(t0));
        }
    }
    let snap = tally.snapshot();
    let (dup_ids, extra) = tally.duplicates();
    let _ = writeln!(
        s,
        "deliveries: {} distinct ids, {} delivered more than once ({} extra deliveries)",
        snap.len(),
        dup_ids,
        extra
    );
    s
}
