//! Spawning the real `stomp-gateway` binary.
//!
//! The binary is `$STOMP_GATEWAY_BIN`, else `stomp-gateway` next to the
//! test executable's `deps/` directory (`target/debug/stomp-gateway`). Each
//! gateway gets two free ports, a generated config file and a log file under
//! `target/e2e-logs/`; the log path (and its tail) is printed when a test
//! fails while the gateway is alive. Logs of passing tests are removed unless
//! `E2E_KEEP_LOGS` is set.
//!
//! With `E2E_FANOUT=per-session` in the environment, every
//! [`GatewayBuilder::new`] also sets `[fanout] topic`, `exchange` and
//! `user` to `"per-session"`, so the whole relay suite runs once more with
//! each session's own STOMP connection serving its subscriptions instead of
//! the pod's shared upstream (`scripts/test.sh` does this second run). Tests
//! that only make sense on the shared path check [`per_session_mode`] and
//! return early.

use crate::http;
use crate::stomp::{StompClient, ALL_SUBPROTOCOLS};
use anyhow::{bail, Context, Result};
use relay_core::{Command as StompCommand, Frame, Version};
use std::fs::{self, File};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long [`GatewayBuilder::start`] waits for `/readyz`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// `target/debug` (or whichever profile directory holds the test executable).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/e2e-<hash> -> target/debug
    let deps = exe.parent().expect("test executable has a parent");
    if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("deps has a parent").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// The gateway binary; panics with a hint when it has not been built.
pub fn gateway_bin() -> PathBuf {
    let bin = match std::env::var_os("STOMP_GATEWAY_BIN") {
        Some(p) => PathBuf::from(p),
        None => profile_dir().join(format!("stomp-gateway{}", std::env::consts::EXE_SUFFIX)),
    };
    assert!(
        bin.is_file(),
        "stomp-gateway binary not found at {}: run `cargo build -p stomp-gateway` first",
        bin.display()
    );
    bin
}

/// `target/e2e-logs/`, created on first use.
pub fn log_dir() -> PathBuf {
    let dir = profile_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(profile_dir)
        .join("e2e-logs");
    fs::create_dir_all(&dir).expect("create target/e2e-logs");
    dir
}

/// A port nothing listens on right now (bind to :0, read it, close).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

fn file_stem(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{clean}-{:08x}", rand::random::<u32>())
}

/// A TOML basic string for `s`.
pub fn toml_str(s: &str) -> String {
    // A JSON string is a valid TOML basic string.
    serde_json::Value::String(s.to_owned()).to_string()
}

/// Whether `E2E_FANOUT=per-session` asks for the per-session fan-out path.
pub fn per_session_mode() -> bool {
    std::env::var("E2E_FANOUT").is_ok_and(|v| v == "per-session")
}

/// Builds the config file of one gateway: sections of `key = value` lines,
/// values as TOML text. `[server] listen` and `admin_listen` are always
/// set by [`start`](GatewayBuilder::start).
#[derive(Debug, Clone)]
pub struct GatewayBuilder {
    name: String,
    sections: Vec<(String, Vec<(String, String)>)>,
    env: Vec<(String, String)>,
    /// Per-gateway app and user exchanges (the gateway declares them at
    /// start), deleted when the gateway is dropped unless a test set its own.
    own_exchanges: Vec<(&'static str, String)>,
}

impl GatewayBuilder {
    /// Test defaults: relay mode on the local RabbitMQ, quick system-link
    /// reconnects and a debug log; with `E2E_FANOUT=per-session`, the
    /// per-session path for `/topic`, `/exchange` and `/user` (see the module
    /// doc). `name` names the log and config files.
    pub fn new(name: &str) -> GatewayBuilder {
        let app = crate::unique("e2e.gw.app");
        let user = crate::unique("e2e.gw.user");
        let builder = GatewayBuilder {
            name: name.to_owned(),
            sections: Vec::new(),
            env: Vec::new(),
            own_exchanges: Vec::new(),
        }
        .set_str("app", "exchange", &app)
        .set_str("user", "exchange", &user)
        .owning("app", app)
        .owning("user", user)
        .set_str("broker", "mode", "relay")
        .set("broker", "addresses", r#"["127.0.0.1:61613"]"#)
        .set("broker", "reconnect_initial_ms", "100")
        .set("broker", "reconnect_max_ms", "1000")
        .set(
            "log",
            "filter",
            &toml_str("info,stomp_gateway=debug,relay_core=debug"),
        );
        if per_session_mode() {
            builder.per_session()
        } else {
            builder
        }
    }

    fn owning(mut self, section: &'static str, exchange: String) -> GatewayBuilder {
        self.own_exchanges.push((section, exchange));
        self
    }

    /// Sets `[section] key = value`; `value` is TOML text (`"1000"`,
    /// `"\"guest\""`, `"[\"a\"]"`). Replaces an earlier value of the key.
    pub fn set(mut self, section: &str, key: &str, value: &str) -> GatewayBuilder {
        if key == "exchange" {
            // The test chose this exchange; it cleans it up itself.
            self.own_exchanges.retain(|(s, _)| *s != section);
        }
        let idx = match self.sections.iter().position(|(s, _)| s == section) {
            Some(i) => i,
            None => {
                self.sections.push((section.to_owned(), Vec::new()));
                self.sections.len() - 1
            }
        };
        let keys = &mut self.sections[idx].1;
        match keys.iter_mut().find(|(k, _)| k == key) {
            Some(kv) => kv.1 = value.to_owned(),
            None => keys.push((key.to_owned(), value.to_owned())),
        }
        self
    }

    /// Serves `/topic`, `/exchange` and `/user` on each session's own STOMP
    /// connection, opened at CONNECT (`[fanout]` all `"per-session"`): for
    /// tests of that connection itself (its failures, its limits, its
    /// metrics), which the shared path would not exercise.
    pub fn per_session(self) -> GatewayBuilder {
        let per_session = toml_str("per-session");
        self.set("fanout", "topic", &per_session)
            .set("fanout", "exchange", &per_session)
            .set("fanout", "user", &per_session)
    }

    /// Sets a string value (quoted for TOML).
    pub fn set_str(self, section: &str, key: &str, value: &str) -> GatewayBuilder {
        self.set(section, key, &toml_str(value))
    }

    /// Points the gateway at these broker addresses (`host:port`).
    pub fn broker_addresses(self, addresses: &[String]) -> GatewayBuilder {
        let list: Vec<String> = addresses.iter().map(|a| toml_str(a)).collect();
        self.set("broker", "addresses", &format!("[{}]", list.join(", ")))
    }

    /// An environment variable for the gateway process.
    pub fn env(mut self, key: &str, value: &str) -> GatewayBuilder {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// The config file text for the given ports.
    pub fn render(&self, port: u16, admin_port: u16) -> String {
        let mut this = self
            .clone()
            .set_str("server", "listen", &format!("127.0.0.1:{port}"))
            .set_str("server", "admin_listen", &format!("127.0.0.1:{admin_port}"));
        // Keep [server] first for readability.
        this.sections.sort_by_key(|(s, _)| s != "server");
        let mut out = String::new();
        for (section, keys) in &this.sections {
            out.push_str(&format!("[{section}]\n"));
            for (k, v) in keys {
                out.push_str(&format!("{k} = {v}\n"));
            }
            out.push('\n');
        }
        out
    }

    /// Starts the gateway and waits until `/readyz` answers 200 (the system
    /// link to the broker is up).
    pub async fn start(self) -> Gateway {
        self.launch("/readyz").await
    }

    /// Starts the gateway and waits only for `/healthz` (for a gateway whose
    /// broker is unreachable on purpose).
    pub async fn start_unready(self) -> Gateway {
        self.launch("/healthz").await
    }

    /// Starts the gateway for a run that must end on its own (a start-up
    /// failure): waits up to `timeout` for the process to exit and returns
    /// its exit code (`None` when killed by a signal) and its log. Panics
    /// if it is still running then.
    pub async fn start_expect_exit(self, timeout: Duration) -> (Option<i32>, String) {
        let mut gw = self.spawn();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = gw.child.try_wait() {
                return (status.code(), gw.log());
            }
            if Instant::now() >= deadline {
                panic!(
                    "gateway `{}` still running after {timeout:?}; log {}:\n{}",
                    self.name,
                    gw.log_path.display(),
                    tail(&gw.log(), 60)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn launch(self, probe: &str) -> Gateway {
        let mut last_err = String::new();
        // A free port can be taken between picking it and the gateway binding
        // it; retry with new ports in that (rare) case.
        for _attempt in 0..3 {
            let mut gw = self.spawn();
            match gw.wait_for(probe, READY_TIMEOUT).await {
                Ok(()) => return gw,
                Err(e) => {
                    let log = gw.log();
                    if gw.exited() && log.to_ascii_lowercase().contains("in use") {
                        last_err = format!("{e:#}");
                        continue;
                    }
                    panic!(
                        "gateway `{}` did not become ready ({probe}): {e:#}\nconfig {}:\n{}\nlog {}:\n{}",
                        self.name,
                        gw.config_path.display(),
                        fs::read_to_string(&gw.config_path).unwrap_or_default(),
                        gw.log_path.display(),
                        tail(&log, 60)
                    );
                }
            }
        }
        panic!(
            "gateway `{}` could not bind free ports: {last_err}",
            self.name
        );
    }

    fn spawn(&self) -> Gateway {
        let bin = gateway_bin();
        let (port, admin_port) = (free_port(), free_port());
        let stem = file_stem(&self.name);
        let dir = log_dir();
        let config_path = dir.join(format!("{stem}.toml"));
        let log_path = dir.join(format!("{stem}.log"));
        fs::write(&config_path, self.render(port, admin_port)).expect("write gateway config");
        let log = File::create(&log_path).expect("create gateway log");
        let mut cmd = Command::new(&bin);
        cmd.arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log);
        // Only this test's overrides, not whatever the developer's shell has.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("GATEWAY__") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
        let mut exchanges = crate::Topology::new();
        for (_, e) in &self.own_exchanges {
            exchanges.track_exchange(e);
        }
        Gateway {
            exchanges,
            name: self.name.clone(),
            child,
            port,
            admin_port,
            config_path,
            log_path,
        }
    }
}

/// A running gateway process; killed on drop.
#[derive(Debug)]
pub struct Gateway {
    /// Declared by this gateway from its test-default config; deleted on drop
    /// (after the process is killed: fields drop after `Drop::drop`). Only
    /// held for its own `Drop`.
    #[allow(dead_code)]
    exchanges: crate::Topology,
    name: String,
    child: Child,
    port: u16,
    admin_port: u16,
    config_path: PathBuf,
    log_path: PathBuf,
}

impl Gateway {
    /// A builder with test defaults (see [`GatewayBuilder::new`]).
    pub fn builder(name: &str) -> GatewayBuilder {
        GatewayBuilder::new(name)
    }

    /// Starts a gateway with the defaults and waits for readiness.
    pub async fn start(name: &str) -> Gateway {
        GatewayBuilder::new(name).start().await
    }

    /// `ws://127.0.0.1:<port>/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// `127.0.0.1:<admin port>`.
    pub fn admin_addr(&self) -> String {
        format!("127.0.0.1:{}", self.admin_port)
    }

    /// `http://127.0.0.1:<admin port>`.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// HTTP status of `GET <admin><path>`.
    pub async fn admin_get(&self, path: &str) -> Result<http::Response> {
        http::request_async("GET", self.admin_addr(), path.to_owned(), None, None).await
    }

    /// `POST <admin><path>` with a JSON `body` and, when given,
    /// `Authorization: Bearer <token>` (the publish API).
    pub async fn api_post(
        &self,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> Result<http::Response> {
        let headers = token
            .map(|t| vec![("Authorization".to_owned(), format!("Bearer {t}"))])
            .unwrap_or_default();
        http::request_with_headers_async(
            "POST",
            self.admin_addr(),
            path.to_owned(),
            headers,
            Some(body.to_owned()),
        )
        .await
    }

    /// Polls `path` on the admin port until it answers 200.
    pub async fn wait_for(&mut self, path: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no answer yet");
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!("gateway exited with {status} (last {path}: {last})");
            }
            match self.admin_get(path).await {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) => last = format!("HTTP {} {}", r.status, r.body.trim()),
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() >= deadline {
                bail!("{path} not 200 after {timeout:?} (last: {last})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Like [`client`](Self::client), with `extra` headers on the CONNECT
    /// frame (for example `Authorization: Bearer <jwt>`); returns the
    /// client and the CONNECTED frame.
    pub async fn client_with(&self, extra: &[(&str, &str)]) -> Result<(StompClient, Frame)> {
        let mut c = StompClient::connect_ws(&self.ws_url(), &ALL_SUBPROTOCOLS).await?;
        let mut connect = StompClient::connect_frame(Version::V1_2, None, None, (0, 0));
        for (k, v) in extra {
            connect = connect.with_header(*k, *v);
        }
        c.send_frame(&connect).await?;
        let connected = c.read_connected().await.with_context(|| {
            format!(
                "CONNECT to gateway `{}` (log {})",
                self.name,
                self.log_path.display()
            )
        })?;
        Ok((c, connected))
    }

    /// Sends a CONNECT with `extra` headers that the gateway must refuse:
    /// returns the ERROR frame, after checking the connection then closes.
    pub async fn connect_refused(&self, extra: &[(&str, &str)]) -> Result<Frame> {
        let mut c = StompClient::connect_ws(&self.ws_url(), &ALL_SUBPROTOCOLS).await?;
        let mut connect = StompClient::connect_frame(Version::V1_2, None, None, (0, 0));
        for (k, v) in extra {
            connect = connect.with_header(*k, *v);
        }
        c.send_frame(&connect).await?;
        let closed = c.expect_close(crate::WAIT).await?;
        match closed
            .frames
            .iter()
            .find(|f| f.command == StompCommand::Error)
        {
            Some(e) => Ok(e.clone()),
            None => bail!(
                "connection closed without an ERROR; frames: [{}]",
                closed
                    .frames
                    .iter()
                    .map(crate::show)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// Opens a WebSocket with all three STOMP subprotocols and completes a
    /// STOMP 1.2 CONNECT without heart-beats.
    pub async fn client(&self) -> Result<StompClient> {
        StompClient::open(&self.ws_url()).await.with_context(|| {
            format!(
                "client of gateway `{}` (log {})",
                self.name,
                self.log_path.display()
            )
        })
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- gateway `{}` log: {} (config {}); last lines:\n{}",
                self.name,
                self.log_path.display(),
                self.config_path.display(),
                tail(&self.log(), 40)
            );
        } else if std::env::var_os("E2E_KEEP_LOGS").is_none() {
            // Passing tests leave nothing behind unless asked to.
            let _ = fs::remove_file(&self.log_path);
            let _ = fs::remove_file(&self.config_path);
        }
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `stomp-gateway --config <file with config_toml> --check-config`
/// with `env` and returns its output (status, stdout, stderr).
pub fn check_config(name: &str, config_toml: &str, env: &[(&str, &str)]) -> Result<Output> {
    let path = log_dir().join(format!("{}.toml", file_stem(name)));
    fs::write(&path, config_toml).context("write config")?;
    let mut cmd = Command::new(gateway_bin());
    cmd.arg("--config").arg(&path).arg("--check-config");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("GATEWAY__") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .context("run --check-config")?;
    let _ = fs::remove_file(&path);
    Ok(output)
}
