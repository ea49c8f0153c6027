//! Flags shared by every scenario, the run context built from them, the
//! process-wide clock and small helpers.

use crate::client::{parse_heart_beat, ConnOpts, SessionInfo};
use crate::net::{self, SourceIps};
use crate::procstat::Watched;
use anyhow::{anyhow, bail, Context, Result};
use relay_core::{Limits, Version};
use serde_json::{json, Map, Value};
use std::future::Future;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::time::Interval;

/// Connection and reporting flags, the same for every scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// WebSocket URL of the STOMP endpoint (gateway or RabbitMQ Web-STOMP).
    #[arg(long, default_value = "ws://127.0.0.1:15674/ws")]
    pub url: String,
    /// CONNECT login.
    #[arg(long, default_value = "guest")]
    pub login: String,
    /// CONNECT passcode.
    #[arg(long, default_value = "guest")]
    pub passcode: String,
    /// CONNECT host header (RabbitMQ virtual host).
    #[arg(long, default_value = "/")]
    pub vhost: String,
    /// Client heart-beat offer "cx,cy" in ms [default: 0,0; idle: 10000,10000].
    #[arg(long, value_name = "CX,CY")]
    pub heart_beat: Option<String>,
    /// accept-version header: one version or a list, e.g. 1.2 or 1.0,1.1,1.2.
    #[arg(long, default_value = "1.2")]
    pub stomp_version: String,
    /// Sec-WebSocket-Protocol offers, comma separated ("" for none).
    #[arg(long, default_value = "v10.stomp,v11.stomp,v12.stomp")]
    pub subprotocols: String,
    /// Send frames as binary WebSocket messages (default: text, as stomp.js).
    #[arg(long)]
    pub binary: bool,
    /// Seconds allowed for TCP connect + WebSocket handshake + CONNECTED
    /// (also used for SUBSCRIBE receipts).
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    pub connect_timeout: f64,
    /// Bind client sockets to these source addresses, round-robin, to get
    /// past the ephemeral-port limit: "127.0.0.2-127.0.0.50" or a comma list.
    #[arg(long, value_name = "RANGE")]
    pub source_ips: Option<String>,
    /// Sample RSS and CPU of this process: "PID" or "NAME=PID" (repeatable).
    #[arg(long = "measure-pid", value_name = "[NAME=]PID")]
    pub measure_pid: Vec<String>,
    /// Seconds between progress lines on stderr (0 = none).
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    pub progress: f64,
    /// Free-form KEY=VALUE copied into the JSON "tags" (repeatable).
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Exit with status 2 if the run's checks fail (see "check" in the JSON).
    #[arg(long)]
    pub strict: bool,
    /// Record RabbitMQ's connection and queue counts before, during (max)
    /// and after the run (`rabbitmqctl eval` on the local node).
    #[arg(long)]
    pub rabbitmq_counts: bool,
    /// The RabbitMQ node `--rabbitmq-counts` asks (rabbitmqctl -n), e.g.
    /// sgw-bench@localhost [default: rabbitmqctl's default node].
    #[arg(long, value_name = "NODE")]
    pub rabbitmq_node: Option<String>,
    /// Largest STOMP frame the client accepts (bytes).
    #[arg(long, default_value_t = 65536)]
    pub max_frame_size: usize,
}

/// Everything a scenario needs to open sessions and report.
#[derive(Debug)]
pub struct Ctx {
    pub opts: ConnOpts,
    pub sources: SourceIps,
    pub watched: Vec<Watched>,
    pub progress: Duration,
    pub tags: Map<String, Value>,
    pub strict: bool,
    pub nofile: (u64, u64),
    /// The first negotiated session, for the report.
    pub first_session: OnceLock<SessionInfo>,
    errors: Mutex<(u64, Vec<String>)>,
}

/// How many error messages are kept verbatim.
const ERROR_SAMPLES: usize = 10;

impl Ctx {
    /// Builds the context: parses flags, resolves the URL, raises the
    /// file-descriptor limit. `default_hb` is the scenario's heart-beat.
    pub async fn new(c: &Common, default_hb: (u64, u64), ws_read_buffer: usize) -> Result<Ctx> {
        let nofile = net::raise_nofile_limit()?;
        let heart_beat = match &c.heart_beat {
            Some(s) => parse_heart_beat(s)?,
            None => default_hb,
        };
        for v in c.stomp_version.split(',') {
            Version::parse(v).ok_or_else(|| anyhow!("unknown STOMP version {v:?}"))?;
        }
        let uri: tokio_tungstenite::tungstenite::http::Uri = c
            .url
            .parse()
            .with_context(|| format!("bad URL {:?}", c.url))?;
        match uri.scheme_str() {
            Some("ws") => {}
            Some("wss") => bail!("wss:// is not supported (no TLS in stomp-load)"),
            _ => bail!("URL must start with ws://"),
        }
        let host = uri.host().ok_or_else(|| anyhow!("URL has no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(80);
        let addr = tokio::net::lookup_host((host, port))
            .await
            .with_context(|| format!("resolving {host}:{port}"))?
            .next()
            .ok_or_else(|| anyhow!("{host}:{port} resolves to nothing"))?;
        positive("--connect-timeout", c.connect_timeout)?;
        let subprotocols = c
            .subprotocols
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        let sources = match &c.source_ips {
            Some(s) => SourceIps::parse(s)?,
            None => SourceIps::default(),
        };
        let watched = c
            .measure_pid
            .iter()
            .map(|s| Watched::parse(s))
            .collect::<Result<Vec<_>>>()?;
        let mut tags = Map::new();
        for t in &c.tags {
            let (k, v) = t
                .split_once('=')
                .ok_or_else(|| anyhow!("--tag {t:?} is not KEY=VALUE"))?;
            tags.insert(k.to_owned(), Value::String(v.to_owned()));
        }
        Ok(Ctx {
            opts: ConnOpts {
                url: c.url.clone(),
                addr,
                login: c.login.clone(),
                passcode: c.passcode.clone(),
                host: c.vhost.clone(),
                accept_version: c.stomp_version.clone(),
                heart_beat,
                subprotocols,
                binary: c.binary,
                connect_timeout: Duration::from_secs_f64(c.connect_timeout),
                limits: Limits {
                    max_frame_size: c.max_frame_size,
                    ..Limits::default()
                },
                ws_read_buffer,
            },
            sources,
            watched,
            progress: Duration::from_secs_f64(c.progress.max(0.0)),
            tags,
            strict: c.strict,
            nofile,
            first_session: OnceLock::new(),
            errors: Mutex::new((0, Vec::new())),
        })
    }

    /// Counts an error and keeps the first few messages.
    pub fn error(&self, msg: String) {
        if let Ok(mut e) = self.errors.lock() {
            e.0 += 1;
            if e.1.len() < ERROR_SAMPLES {
                e.1.push(msg);
            }
        }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.lock().map(|e| e.0).unwrap_or(0)
    }

    /// `{"count": n, "samples": [...]}`.
    pub fn errors_json(&self) -> Value {
        match self.errors.lock() {
            Ok(e) => json!({ "count": e.0, "samples": e.1 }),
            Err(_) => json!({ "count": null, "samples": [] }),
        }
    }

    pub fn note_session(&self, info: &SessionInfo) {
        let _ = self.first_session.set(info.clone());
    }

    /// Connection parameters as JSON (passcode omitted).
    pub fn connection_json(&self) -> Value {
        let o = &self.opts;
        json!({
            "login": o.login,
            "vhost": o.host,
            "accept_version": o.accept_version,
            "heart_beat": format!("{},{}", o.heart_beat.0, o.heart_beat.1),
            "subprotocols": o.subprotocols,
            "ws_message_type": if o.binary { "binary" } else { "text" },
            "connect_timeout_s": o.connect_timeout.as_secs_f64(),
            "source_ips": self.sources.len(),
            "nofile_soft": self.nofile.0,
            "nofile_hard": self.nofile.1,
        })
    }

    /// What the server negotiated with the first session.
    pub fn session_json(&self) -> Value {
        match self.first_session.get() {
            None => Value::Null,
            Some(i) => json!({
                "version": i.version.as_str(),
                "subprotocol": i.subprotocol,
                "server": i.server,
                "server_heart_beat": i.server_heart_beat,
                "send_every_ms": i.send_every.map(|d| d.as_millis() as u64),
                "expect_every_ms": i.expect_every.map(|d| d.as_millis() as u64),
            }),
        }
    }

    /// Warns when the sessions about to be opened will not fit.
    pub fn check_fd_budget(&self, sessions: usize) {
        let need = sessions as u64 + 64;
        if need > self.nofile.0 {
            crate::progress::note(
                "warning",
                &format!(
                    "{sessions} sessions need about {need} file descriptors but the limit is {}",
                    self.nofile.0
                ),
            );
        }
    }
}

/// What a scenario hands back: parameters, results and failed checks.
#[derive(Debug)]
pub struct Outcome {
    pub params: Value,
    pub results: Value,
    pub failures: Vec<String>,
}

static BASE: OnceLock<Instant> = OnceLock::new();

/// The process-wide time base; call once early.
pub fn init_clock() {
    let _ = BASE.get_or_init(Instant::now);
}

fn base() -> Instant {
    *BASE.get_or_init(Instant::now)
}

/// Nanoseconds since the process-wide base.
pub fn now_ns() -> u64 {
    ns_of(Instant::now())
}

/// `t` as nanoseconds since the process-wide base (0 if earlier).
pub fn ns_of(t: Instant) -> u64 {
    t.saturating_duration_since(base()).as_nanos() as u64
}

/// Ticks `i`, or never completes when there is no interval.
pub async fn tick_opt(i: &mut Option<Interval>) {
    match i {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending::<()>().await,
    }
}

/// A heart-beat interval for `every`, first tick one period from now.
pub fn heartbeat_interval(every: Option<Duration>) -> Option<Interval> {
    every.map(|d| {
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + d, d);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    })
}

/// Runs `f` with a timeout, mapping the timeout to an error.
pub async fn within<T>(d: Duration, what: &str, f: impl Future<Output = Result<T>>) -> Result<T> {
    match tokio::time::timeout(d, f).await {
        Ok(r) => r,
        Err(_) => bail!("{what}: timed out after {:.1} s", d.as_secs_f64()),
    }
}

/// Seconds as a float with millisecond precision.
pub fn secs(d: Duration) -> f64 {
    crate::procstat::round3(d.as_secs_f64())
}

/// Validates a positive float flag.
pub fn positive(name: &str, v: f64) -> Result<()> {
    if v > 0.0 && v.is_finite() {
        Ok(())
    } else {
        bail!("{name} must be positive, got {v}")
    }
}

/// Completes once the watch holds `true` (or its sender is gone).
pub async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
