//! Spawning the example backend `chat-backend` (examples/chat-backend).
//!
//! The binary is `$CHAT_BACKEND_BIN`, else `chat-backend` next to the
//! gateway binary (`target/debug/chat-backend`, built by
//! `cargo build --workspace --bins`). Its log goes to `target/e2e-logs/`;
//! it is killed on drop and its log printed when a test fails.

use crate::gateway::{log_dir, profile_dir, tail};
use anyhow::{bail, Result};
use std::fs::{self, File};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

/// The backend binary; panics with a hint when it has not been built.
pub fn backend_bin() -> PathBuf {
    let bin = match std::env::var_os("CHAT_BACKEND_BIN") {
        Some(p) => PathBuf::from(p),
        None => profile_dir().join(format!("chat-backend{}", std::env::consts::EXE_SUFFIX)),
    };
    assert!(
        bin.is_file(),
        "chat-backend binary not found at {}: run `cargo build --workspace --bins` first",
        bin.display()
    );
    bin
}

/// A running `chat-backend`; killed on drop.
#[derive(Debug)]
pub struct ChatBackend {
    child: Child,
    log_path: PathBuf,
}

impl ChatBackend {
    /// Starts `chat-backend` with these flags (for example `--queue q`) and
    /// waits until it logs that it consumes its queue.
    pub async fn start(name: &str, args: &[&str]) -> Result<ChatBackend> {
        let log_path = log_dir().join(format!("{name}-backend-{:08x}.log", rand::random::<u32>()));
        let log = File::create(&log_path)?;
        let child = Command::new(backend_bin())
            .args(args)
            .env("AMQP_URL", crate::amqp::AMQP_URL)
            .env("RUST_LOG", "info,chat_backend=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut backend = ChatBackend { child, log_path };
        backend
            .wait_for_log("consuming", Duration::from_secs(20))
            .await?;
        Ok(backend)
    }

    /// The log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        self.wait_for_log_count(needle, 1, timeout).await
    }

    /// Waits until the log contains `needle` at least `n` times.
    pub async fn wait_for_log_count(
        &mut self,
        needle: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().matches(needle).count() >= n {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "chat-backend exited with {status} before logging {needle:?}:\n{}",
                    tail(&self.log(), 40)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "chat-backend did not log {needle:?} within {timeout:?}:\n{}",
                    tail(&self.log(), 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for ChatBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- chat-backend log {}; last lines:\n{}",
                self.log_path.display(),
                tail(&self.log(), 40)
            );
        } else if std::env::var_os("E2E_KEEP_LOGS").is_none() {
            let _ = fs::remove_file(&self.log_path);
        }
    }
}
