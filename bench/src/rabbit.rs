//! RabbitMQ's own counts during a run (`--rabbitmq-counts`): open
//! connections (every protocol) and queues on one node (the local default
//! node, or `--rabbitmq-node`, e.g. the benchmark's own), sampled with
//! `rabbitmqctl eval` (authoritative, unlike the management API's lagging
//! statistics) before, every few seconds during, and after the scenario.
//! With the shared path or the embedded broker the point is what does *not*
//! grow with the number of browsers.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// (connections, queues) on `node` (None: rabbitmqctl's default node) now.
pub async fn counts(node: Option<&str>) -> Result<(u64, u64)> {
    let mut cmd = tokio::process::Command::new("rabbitmqctl");
    if let Some(n) = node {
        cmd.args(["-n", n]);
    }
    let out = cmd
        .args([
            "-q",
            "eval",
            "{length(rabbit_connection_tracking:list()), length(rabbit_amqqueue:list())}.",
        ])
        .output()
        .await
        .context("running rabbitmqctl eval")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("rabbitmqctl eval failed: {text}");
    }
    let nums: Vec<u64> = text
        .trim()
        .trim_matches(|c| c == '{' || c == '}')
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    match nums[..] {
        [c, q] => Ok((c, q)),
        _ => bail!("unexpected rabbitmqctl output {text:?}"),
    }
}

/// Samples [`counts`] in the background until dropped into [`Sampler::finish`].
#[derive(Debug)]
pub struct Sampler {
    node: Option<String>,
    before: Option<(u64, u64)>,
    max: Arc<Mutex<(u64, u64)>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    pub async fn start(every: Duration, node: Option<String>) -> Sampler {
        let before = counts(node.as_deref()).await.ok();
        let max = Arc::new(Mutex::new(before.unwrap_or((0, 0))));
        let task = tokio::spawn({
            let max = max.clone();
            let node = node.clone();
            async move {
                loop {
                    tokio::time::sleep(every).await;
                    if let Ok((c, q)) = counts(node.as_deref()).await {
                        if let Ok(mut m) = max.lock() {
                            *m = (m.0.max(c), m.1.max(q));
                        }
                    }
                }
            }
        });
        Sampler {
            node,
            before,
            max,
            task,
        }
    }

    /// Stops sampling: before, max during, after.
    pub async fn finish(self) -> Value {
        self.task.abort();
        let after = counts(self.node.as_deref()).await.ok();
        let max = self.max.lock().map(|m| *m).unwrap_or((0, 0));
        let max = (
            max.0.max(after.map_or(0, |a| a.0)),
            max.1.max(after.map_or(0, |a| a.1)),
        );
        json!({
            "source": "rabbitmqctl eval, sampled every few seconds",
            "node": self.node,
            "connections": { "before": self.before.map(|b| b.0), "max": max.0, "after": after.map(|a| a.0) },
            "queues": { "before": self.before.map(|b| b.1), "max": max.1, "after": after.map(|a| a.1) },
        })
    }
}
