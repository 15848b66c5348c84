//! The operator binary as a child process of the test: start, stop, its log and its metrics.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{DEADLINE, Result, Stack, StackError, io};

pub(super) struct Operator {
    pub(super) child: tokio::process::Child,
}

impl Stack {
    /// Starts the operator (`run --leader-election false --metrics-addr … --watch-namespaces …`
    /// plus [`StackConfig::operator_args`](super::StackConfig::operator_args)) with its output
    /// appended to [`Stack::operator_log`], and waits until its metrics endpoint answers. Call it
    /// from async code on the runtime (not from `spawn_blocking`): the child dies with the thread
    /// that started it.
    pub async fn start_operator(&mut self) -> Result<()> {
        if self.operator.is_some() {
            return Err(StackError::Operator("is already running".into()));
        }
        let bin =
            self.config.operator_bin.clone().ok_or_else(|| StackError::Operator("binary not configured".into()))?;
        let log_path = self.operator_log_path();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(io("operator log"))?;
        let err = log.try_clone().map_err(io("operator log"))?;
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.args(["run", "--leader-election", "false", "--metrics-addr"])
            .arg(self.metrics_addr.to_string())
            .args(["--watch-namespaces", &self.namespace])
            .args(&self.config.operator_args)
            .env("KUBECONFIG", &self.kubeconfig_path)
            .envs(self.config.operator_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent. If the test
        // process dies without unwinding, the operator dies with it.
        unsafe {
            cmd.as_std_mut().pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(io(format!("start {}", bin.display())))?;
        self.operator = Some(Operator { child });
        let addr = self.metrics_addr;
        let deadline = Instant::now() + DEADLINE;
        loop {
            if http_get(addr, "/healthz").is_ok() {
                return Ok(());
            }
            if let Some(status) = self.operator.as_mut().and_then(|o| o.child.try_wait().ok().flatten()) {
                self.operator = None;
                return Err(StackError::Operator(format!("exited ({status}) at start:\n{}", self.operator_log())));
            }
            if Instant::now() > deadline {
                return Err(StackError::Timeout { what: "the operator's /healthz".into(), after: DEADLINE });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The operator's process id while it runs (benchmarks read its CPU time and memory).
    pub fn operator_pid(&self) -> Option<u32> {
        self.operator.as_ref().and_then(|o| o.child.id())
    }

    /// SIGTERM to the operator, then waits (up to [`DEADLINE`], then SIGKILL) for it to exit.
    pub async fn stop_operator(&mut self) -> Result<ExitStatus> {
        let mut op = self.operator.take().ok_or_else(|| StackError::Operator("is not running".into()))?;
        if let Some(pid) = op.child.id().and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: kill(2) on the pid of our own unreaped child; no memory is touched.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        match tokio::time::timeout(DEADLINE, op.child.wait()).await {
            Ok(status) => status.map_err(io("wait for the operator")),
            Err(_) => {
                let _ = op.child.kill().await;
                Err(StackError::Timeout { what: "the operator to exit after SIGTERM".into(), after: DEADLINE })
            }
        }
    }

    /// Whether the operator process is running (reaps it if it exited).
    pub fn operator_running(&mut self) -> bool {
        match self.operator.as_mut() {
            Some(op) => op.child.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// Where the operator's stdout and stderr go (appended across restarts).
    pub fn operator_log_path(&self) -> PathBuf {
        self.dir.path().join("operator.log")
    }

    /// Everything the operator printed so far (all runs).
    pub fn operator_log(&self) -> String {
        std::fs::read_to_string(self.operator_log_path()).unwrap_or_default()
    }

    /// `127.0.0.1:PORT` of the operator's `/metrics`, `/healthz`, `/readyz`.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The operator's `/metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        let addr = self.metrics_addr;
        tokio::task::spawn_blocking(move || http_get(addr, "/metrics")).await.expect("metrics thread")
    }

    /// The sum of the samples of metric `name` whose labels include every `labels` pair; `None`
    /// when no such sample exists (or the operator does not answer).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        metric_value(&self.metrics().await.ok()?, name, labels)
    }
}

/// A blocking `GET` over HTTP/1.1 (no client dependency for one endpoint); the body on 2xx.
fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(io("connect to the operator"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(io("set read timeout"))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").map_err(io("send request"))?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(io("read response"))?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let ok = head.split_whitespace().nth(1).is_some_and(|code| code.starts_with('2'));
    if ok { Ok(body.to_string()) } else { Err(StackError::Operator(format!("answered GET {path}: {head}"))) }
}

/// Sum of the samples of `name` (exact metric name) whose label set includes every pair.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let (metric, label_text) = series.split_once('{').unwrap_or((series, ""));
        if metric != name || !labels.iter().all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\""))) {
            continue;
        }
        if let Ok(v) = value.parse::<f64>() {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_values_sum_matching_series() {
        let text = "# HELP x\ncelery_operator_reconcile_total{kind=\"WorkerPool\"} 3\n\
                    celery_operator_reconcile_total{kind=\"TaskQueue\"} 2\nother 1\n";
        assert_eq!(metric_value(text, "celery_operator_reconcile_total", &[("kind", "WorkerPool")]), Some(3.0));
        assert_eq!(metric_value(text, "celery_operator_reconcile_total", &[]), Some(5.0));
        assert_eq!(metric_value(text, "celery_operator_reconcile", &[]), None);
    }
}
