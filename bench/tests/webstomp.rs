//! Runs the real `stomp-load` binary against RabbitMQ's Web-STOMP endpoint
//! (ws://127.0.0.1:15674/ws, override with WEB_STOMP_URL) with tiny loads and
//! checks its JSON. Needs the local RabbitMQ with rabbitmq_web_stomp enabled
//! (scripts/rabbitmq-setup.sh); nothing is skipped when it is missing.

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;

fn url() -> String {
    std::env::var("WEB_STOMP_URL").unwrap_or_else(|_| "ws://127.0.0.1:15674/ws".into())
}

/// Runs stomp-load with `args`, requires exit status 0, parses stdout.
fn stomp_load(args: &[&str]) -> Result<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_stomp-load"))
        .args(args)
        .output()
        .context("running stomp-load")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "stomp-load {args:?} failed with {}:\n{stderr}",
        out.status
    );
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("stdout is not one JSON object; stderr:\n{stderr}"))
}

#[test]
fn tiny_throughput_against_web_stomp_delivers_everything() -> Result<()> {
    let url = url();
    let v = stomp_load(&[
        "throughput",
        "--url",
        &url,
        "--publishers",
        "1",
        "--subscribers",
        "1",
        "--rate",
        "100",
        "--warmup",
        "0",
        "--duration",
        "1",
        "--drain-max",
        "5",
        "--progress",
        "0",
        "--tag",
        "case=test",
    ])?;
    assert_eq!(v["scenario"], "throughput");
    assert_eq!(v["url"], url.as_str());
    assert_eq!(v["tags"]["case"], "test");
    assert_eq!(v["params"]["mode"], "fixed_rate");
    let r = &v["results"];
    let delivered = r["delivered"].as_u64().context("results.delivered")?;
    assert!(delivered > 0, "nothing delivered: {r}");
    assert_eq!(r["loss"], 0, "{r}");
    assert_eq!(r["expected"], r["delivered"], "{r}");
    assert_eq!(r["errors"]["count"], 0, "{r}");
    assert!(r["latency_ms"]["count"].as_u64().unwrap_or(0) > 0, "{r}");
    assert!(r["latency_ms"]["p50"].as_f64().unwrap_or(-1.0) > 0.0, "{r}");
    assert_eq!(r["session"]["version"], "1.2", "{r}");
    assert_eq!(v["check"]["ok"], true, "{}", v["check"]);
    Ok(())
}

#[test]
fn tiny_connect_storm_and_idle_against_web_stomp() -> Result<()> {
    let url = url();
    let pid = std::process::id().to_string();
    let me = format!("test={pid}");
    let v = stomp_load(&[
        "connect-storm",
        "--url",
        &url,
        "--sessions",
        "5",
        "--concurrency",
        "2",
        "--progress",
        "0",
        "--measure-pid",
        &me,
        "--strict",
    ])?;
    let r = &v["results"];
    assert_eq!(r["connected"], 5, "{r}");
    assert_eq!(r["closed_cleanly"], 5, "{r}");
    assert_eq!(r["time_to_connected_ms"]["count"], 5, "{r}");
    assert!(r["sessions_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
    let names: Vec<&str> = r["processes"]
        .as_array()
        .context("processes")?
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names, ["test", "stomp-load"], "{r}");

    let v = stomp_load(&[
        "idle",
        "--url",
        &url,
        "--sessions",
        "3",
        "--hold",
        "1",
        "--settle",
        "0",
        "--heart-beat",
        "500,500",
        "--progress",
        "0",
        "--strict",
    ])?;
    let r = &v["results"];
    assert_eq!(r["up_at_end"], 3, "{r}");
    assert_eq!(r["dropped"], 0, "{r}");
    assert!(r["heartbeats_sent"].as_u64().unwrap_or(0) > 0, "{r}");
    Ok(())
}

#[test]
fn failed_checks_make_strict_runs_fail() -> Result<()> {
    // Nothing listens on port 1: the run fails before any JSON.
    let out = Command::new(env!("CARGO_BIN_EXE_stomp-load"))
        .args([
            "throughput",
            "--url",
            "ws://127.0.0.1:1/ws",
            "--duration",
            "1",
            "--progress",
            "0",
            "--strict",
        ])
        .output()?;
    assert!(!out.status.success());
    Ok(())
}

fn run_json(case: &str, target: &str, round: u32, results: Value) -> Value {
    json!({
        "scenario": "x",
        "url": "ws://x/ws",
        "argv": ["stomp-load", case, "--url", "ws://x/ws"],
        "tags": { "case": case, "target": target, "round": round.to_string() },
        "params": { "rate": if case == "latency" { json!(2000.0) } else { Value::Null }, "sessions": 2000, "concurrency": 50 },
        "results": results,
        "check": { "ok": true, "failures": [] },
    })
}

fn procs(gw: Option<Value>, rabbit: Value) -> Value {
    let mut v = vec![json!({ "name": "rabbitmq", "derived": rabbit })];
    if let Some(g) = gw {
        v.push(json!({ "name": "gateway", "derived": g }));
    }
    Value::Array(v)
}

#[test]
fn report_writes_markdown_and_svg() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("stomp-load-report-test-{}", std::process::id()));
    let runs = dir.join("runs");
    std::fs::create_dir_all(&runs)?;
    let mut files: Vec<(String, Value)> = Vec::new();
    for round in 1..=3u32 {
        let k = f64::from(round);
        for (target, factor) in [("gateway", 1.1), ("direct", 1.0)] {
            let gw = target == "gateway";
            files.push((
                format!("throughput.{target}.r{round}.json"),
                run_json(
                    "throughput",
                    target,
                    round,
                    json!({
                        "delivered_per_s": 10000.0 / factor + k, "sent_per_s": 10000.0, "loss": 0,
                        "processes": procs(
                            gw.then(|| json!({ "cpu_us_per_msg_delivered": 10.0 })),
                            json!({ "cpu_us_per_msg_delivered": 40.0 }),
                        ),
                    }),
                ),
            ));
            files.push((
                format!("latency.{target}.r{round}.json"),
                run_json(
                    "latency",
                    target,
                    round,
                    json!({
                        "delivered_per_s": 2000.0, "loss": 0,
                        "latency_ms": { "p50": 0.5 * factor, "p90": 0.8 * factor, "p99": 1.5 * factor,
                                        "p99_9": 3.0 * factor, "max": 9.0 * factor },
                        "processes": procs(None, json!({})),
                    }),
                ),
            ));
            files.push((
                format!("connect-storm.{target}.r{round}.json"),
                run_json(
                    "connect-storm",
                    target,
                    round,
                    json!({ "sessions_per_s": 1000.0 / factor, "failed": 0,
                            "time_to_connected_ms": { "p50": 20.0, "p99": 60.0 } }),
                ),
            ));
            files.push((
                format!("idle.{target}.r{round}.json"),
                run_json(
                    "idle",
                    target,
                    round,
                    json!({
                        "up_at_end": 2000,
                        "processes": procs(
                            gw.then(|| json!({ "rss_kib_per_session": 12.0 + k, "cpu_pct_hold": 0.5 })),
                            json!({ "rss_kib_per_session": 100.0, "cpu_pct_hold": 2.0 }),
                        ),
                    }),
                ),
            ));
        }
    }
    // The paced search (gateway = per-session) and the shared path's cases.
    for (target, sustained) in [("gateway", 3000.0), ("direct", 3200.0)] {
        files.push((
            format!("paced.{target}.r1.json"),
            run_json(
                "paced",
                target,
                1,
                json!({ "sustained_per_s": sustained, "at_sustained": { "latency_ms": { "p99": 2.0 } } }),
            ),
        ));
    }
    for (target, delivered, conns) in [("shared", 100_000.0, 3), ("direct", 8_000.0, 10_000)] {
        files.push((
            format!("fanout-wide.{target}.r1.json"),
            run_json(
                "fanout-wide",
                target,
                1,
                json!({
                    "delivered_per_s": delivered,
                    "subscribers": { "subscribed": 10_000 },
                    "rabbitmq": { "connections": { "max": conns }, "queues": { "max": 1 } },
                }),
            ),
        ));
    }
    files.push((
        "idle-subscribed.shared.r1.json".into(),
        run_json(
            "idle-subscribed",
            "shared",
            1,
            json!({
                "up_at_end": 2000,
                "processes": procs(Some(json!({ "rss_kib_per_session": 9.5 })), json!({})),
            }),
        ),
    ));
    files.push((
        "connect-storm.shared.r1.json".into(),
        run_json(
            "connect-storm",
            "shared",
            1,
            json!({ "sessions_per_s": 2500.0, "failed": 0 }),
        ),
    ));
    for (name, v) in &files {
        std::fs::write(runs.join(name), serde_json::to_string(v)?)?;
    }
    let md = dir.join("out/benchmarks.md");
    let svg = dir.join("out/benchmarks-latency.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_stomp-load"))
        .args(["report", "--runs"])
        .arg(&runs)
        .arg("--markdown")
        .arg(&md)
        .arg("--svg")
        .arg(&svg)
        .args(["--rabbitmq-version", "9.9.9", "--note", "a test note"])
        .output()?;
    ensure!(
        out.status.success(),
        "report failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&md)?;
    for needle in [
        "| RabbitMQ | 9.9.9 |",
        "## Targets",
        "a test note",
        "benchmarks-latency.svg",
        // Columns: the targets that ran, then their ratios to direct.
        "| Figure | shared | per-session | direct | shared/direct | per-session/direct |",
        // Throughput: gateway (= per-session) 10000/1.1 + 2 vs 10002: ratio 0.91, met.
        "(this run: open loop): per-session delivered msg/s ≥ 0.9 × direct",
        "| 9093 vs 10002 msg/s (ratio 0.91) | **met**",
        // p99 1.65 vs 1.5 ms: met.
        "(this run: fixed 2000 msg/s): per-session p99 ≤ direct p99 + 1 ms | p99 1.65 ms vs 1.50 ms | **met**",
        // Storm ratio 1/1.1 = 0.91: met.
        "(this run: 2000 sessions at concurrency 50): per-session sessions/s ≥ 0.9 × direct | 909.1 vs 1000 sessions/s (ratio 0.91) | **met**",
        // Paced search: 3000 vs 3200, 0.94: met.
        "per-session highest sustained msg/s ≥ 0.9 × direct | 3000 vs 3200 msg/s (ratio 0.94) | **met**",
        // The shared path: RabbitMQ cost, fan-out, idle density, storm.
        "fanout-wide: 3 connections, 1 queues with 10000 browser sessions | **met**",
        "shared delivered msg/s ≥ 10 × direct | 100000 vs 8000 msg/s (ratio 12.50) | **met**",
        "9.50 KiB per session (2000 sessions up) | **missed**",
        "shared sessions/s ≥ 2 × direct (a session needs no broker handshake) | 2500 vs 1000 sessions/s (ratio 2.50) | **met**",
        // RSS median 14 KiB <= 16: met.
        "14 KiB per session (2000 sessions up) | **met**",
        // CPU 10 vs 40 µs: 0.25 <= 1/3, met.
        "10 µs vs 40 µs per message (ratio 0.25) | **met**",
        "| Idle: gateway RSS KiB per session | — | 14 | n/a | n/a | n/a |",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    let svg_text = std::fs::read_to_string(&svg)?;
    assert!(
        svg_text.starts_with("<svg"),
        "{}",
        &svg_text[..svg_text.len().min(200)]
    );
    assert!(svg_text.contains("per-session") && svg_text.contains("p99.9"));
    let _ = std::fs::remove_dir_all(PathBuf::from(&dir));
    Ok(())
}
