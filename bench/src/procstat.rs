//! Resident memory and CPU time of watched processes, read from /proc.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::time::Instant;

/// One process given with `--measure-pid [NAME=]PID`.
#[derive(Debug, Clone)]
pub struct Watched {
    pub name: String,
    pub pid: u32,
}

impl Watched {
    /// Parses `1234` or `gateway=1234`. Without a name, the process's
    /// `comm` is used.
    pub fn parse(spec: &str) -> Result<Watched> {
        let (name, pid) = match spec.split_once('=') {
            Some((n, p)) => (Some(n.trim().to_owned()), p),
            None => (None, spec),
        };
        let pid: u32 = pid
            .trim()
            .parse()
            .with_context(|| format!("bad pid in {spec:?}"))?;
        let name = match name {
            Some(n) if !n.is_empty() => n,
            _ => std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|s| s.trim().to_owned())
                .with_context(|| format!("no process {pid}"))?,
        };
        Ok(Watched { name, pid })
    }
}

/// One reading.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    pub rss_kib: u64,
    pub cpu_s: f64,
}

/// Reads VmRSS (KiB) from /proc/PID/status and utime+stime (seconds) from
/// /proc/PID/stat (all threads of the process).
pub fn read(pid: u32, clk_tck: f64) -> Result<Reading> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may contain spaces and parentheses: fields start
    // after the last ')'. utime and stime are fields 14 and 15 (1-based),
    // i.e. the 12th and 13th after the name.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.len() < 13 {
        bail!("malformed /proc/{pid}/stat");
    }
    let utime: u64 = fields[11].parse().context("utime")?;
    let stime: u64 = fields[12].parse().context("stime")?;
    Ok(Reading {
        rss_kib,
        cpu_s: (utime + stime) as f64 / clk_tck,
    })
}

pub fn clk_tck() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

#[derive(Debug)]
struct Series {
    who: Watched,
    samples: Vec<(String, f64, Option<Reading>)>,
    error: Option<String>,
}

/// Samples the watched processes (and this process) at named phases.
#[derive(Debug)]
pub struct Monitor {
    series: Vec<Series>,
    clk_tck: f64,
    start: Instant,
}

impl Monitor {
    pub fn new(watched: &[Watched]) -> Monitor {
        let me = Watched {
            name: "stomp-load".into(),
            pid: std::process::id(),
        };
        let series = watched
            .iter()
            .cloned()
            .chain(std::iter::once(me))
            .map(|who| Series {
                who,
                samples: Vec::new(),
                error: None,
            })
            .collect();
        Monitor {
            series,
            clk_tck: clk_tck(),
            start: Instant::now(),
        }
    }

    /// Takes one reading of every process, labelled `phase`.
    pub fn sample(&mut self, phase: &str) {
        let t = self.start.elapsed().as_secs_f64();
        for s in &mut self.series {
            let r = match read(s.who.pid, self.clk_tck) {
                Ok(r) => Some(r),
                Err(e) => {
                    s.error.get_or_insert_with(|| format!("{e:#}"));
                    None
                }
            };
            s.samples.push((phase.to_owned(), t, r));
        }
    }

    fn reading(s: &Series, phase: &str) -> Option<(f64, Reading)> {
        s.samples
            .iter()
            .rev()
            .find(|(p, _, _)| p == phase)
            .and_then(|(_, t, r)| r.map(|r| (*t, r)))
    }

    /// JSON for every process: samples plus whatever `derive` computes from
    /// a lookup of (phase -> (t_s, reading)).
    pub fn to_json(
        &self,
        derive: impl Fn(&dyn Fn(&str) -> Option<(f64, Reading)>) -> Value,
    ) -> Value {
        let list: Vec<Value> = self
            .series
            .iter()
            .map(|s| {
                let samples: Vec<Value> = s
                    .samples
                    .iter()
                    .map(|(phase, t, r)| {
                        json!({
                            "phase": phase,
                            "t_s": round3(*t),
                            "rss_kib": r.map(|r| r.rss_kib),
                            "cpu_s": r.map(|r| round3(r.cpu_s)),
                        })
                    })
                    .collect();
                let lookup = |phase: &str| Monitor::reading(s, phase);
                json!({
                    "name": s.who.name,
                    "pid": s.who.pid,
                    "samples": samples,
                    "derived": derive(&lookup),
                    "error": s.error,
                })
            })
            .collect();
        Value::Array(list)
    }
}

/// Rounds to 3 decimals for readable JSON.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() -> Result<()> {
        let r = read(std::process::id(), clk_tck())?;
        assert!(r.rss_kib > 0);
        assert!(r.cpu_s >= 0.0);
        let w = Watched::parse(&format!("me={}", std::process::id()))?;
        assert_eq!(w.name, "me");
        let w = Watched::parse(&std::process::id().to_string())?;
        assert!(!w.name.is_empty());
        assert!(Watched::parse("x=y").is_err());
        Ok(())
    }
}
