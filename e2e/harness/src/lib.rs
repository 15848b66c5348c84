//! Real broker processes and the Celery virtualenv, for tests.
//!
//! Everything here starts *real* programs — `redis-server`, `rabbitmq-server`, Python with Celery
//! from PyPI — on free loopback ports in temporary directories. Nothing touches the machine's own
//! services on the standard ports.
//!
//! - [`RedisServer`]: a private redis-server (optionally TLS, password, extra config lines), killed on
//!   drop; [`RedisServer::kill`] / [`RedisServer::restart`] for failure tests.
//! - [`RabbitServer`]: a private RabbitMQ node with the management plugin, stopped on drop;
//!   [`RabbitServer::shared`] gives one node per test binary (use unique queue names or vhosts).
//! - [`python`]: the Celery venv ([`python::celery_venv`]), [`python::run_script`] to run a snippet
//!   in it, and [`python::CeleryWorker`], a real `celery worker` process killed on drop.
//! - [`free_port`] and [`wait_until`] (poll with a deadline; the harness never sleeps to synchronise).
//!
//! Every process is started in its own process group and watched by a tiny `sh` reaper that kills the
//! group when the test binary goes away, even when it is killed without unwinding.
//!
//! All functions are blocking; from an async test call them directly before the runtime is busy, or
//! through `tokio::task::spawn_blocking`.

mod process;
pub mod python;
mod rabbit;
mod redis;
mod tls;

use std::net::TcpListener;
use std::time::{Duration, Instant};

pub use rabbit::RabbitServer;
pub use redis::{RedisBuilder, RedisServer};
pub use tls::TestCertificates;

/// Why the harness could not provide a process or a venv.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("timed out after {after:?} waiting for {what}{detail}")]
    Timeout { what: String, after: Duration, detail: String },
}

pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Io { what, source }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind 127.0.0.1:0")
}

/// Polls `check` until it returns `Some`, or fails after `timeout`. Polls every 20 ms at first,
/// backing off to 200 ms. `what` names the awaited condition in the error.
pub fn wait_until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(20);
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(HarnessError::Timeout { what: what.to_owned(), after: timeout, detail: String::new() });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}
