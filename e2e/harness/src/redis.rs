//! A private `redis-server` on a free loopback port.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::process::Supervised;
use crate::{HarnessError, Result, TestCertificates, free_port, io_err, wait_until};

const BOOT_TIMEOUT: Duration = Duration::from_secs(20);

/// Options for [`RedisServer`]; start with [`RedisServer::builder`].
#[derive(Debug, Default, Clone)]
#[must_use]
pub struct RedisBuilder {
    config: Vec<String>,
    tls: bool,
    password: Option<String>,
    user: Option<(String, String)>,
    /// Sentinel mode: the master's name and port.
    monitor: Option<(String, u16)>,
}

impl RedisBuilder {
    /// Appends a `redis.conf` line, e.g. `maxmemory 10mb`, `maxmemory-policy allkeys-lru`,
    /// `rename-command CONFIG ""`. Later lines override the harness defaults (`save ""`,
    /// `appendonly no`).
    pub fn config(mut self, line: impl Into<String>) -> Self {
        self.config.push(line.into());
        self
    }

    /// Serves TLS only (`port 0`, `tls-port N`) with certificates generated in the temp dir; clients
    /// need no certificate of their own and must trust [`RedisServer::ca_cert_path`].
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Sets `requirepass`; [`RedisServer::url`] then carries `:password@`.
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// Adds an ACL user with every permission; [`RedisServer::url`] then carries `user:password@`.
    pub fn user(mut self, name: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some((name.into(), password.into()));
        self
    }

    /// Runs a Redis Sentinel (`redis-server --sentinel`) that monitors `master` under `name`
    /// (quorum 1) instead of a data server; [`RedisServer::url`] is then `sentinel://127.0.0.1:PORT`.
    pub fn sentinel(mut self, name: impl Into<String>, master: &RedisServer) -> Self {
        self.monitor = Some((name.into(), master.port()));
        self
    }

    pub fn start(self) -> Result<RedisServer> {
        let dir = tempfile::Builder::new().prefix("redis-test-").tempdir().map_err(io_err("create redis temp dir"))?;
        let port = free_port();
        let certs = if self.tls { Some(TestCertificates::generate(dir.path())?) } else { None };
        let conf = render_config(&self, dir.path(), port, certs.as_ref());
        let conf_path = dir.path().join("redis.conf");
        std::fs::write(&conf_path, conf).map_err(io_err("write redis.conf"))?;
        let userinfo = match (&self.user, &self.password) {
            (Some((name, password)), _) => format!("{name}:{password}@"),
            (None, Some(password)) => format!(":{password}@"),
            (None, None) => String::new(),
        };
        let mut server = RedisServer {
            dir,
            conf_path,
            port,
            certs,
            userinfo,
            cli_auth: self.user.clone().or(self.password.clone().map(|p| ("default".into(), p))),
            sentinel: self.monitor.is_some(),
            process: None,
        };
        server.restart()?;
        Ok(server)
    }
}

fn render_config(opts: &RedisBuilder, dir: &Path, port: u16, certs: Option<&TestCertificates>) -> String {
    let mut lines = vec![
        "bind 127.0.0.1".to_owned(),
        format!("dir {}", dir.display()),
        format!("logfile {}", dir.join("redis.log").display()),
        "daemonize no".to_owned(),
        "save \"\"".to_owned(),
        "appendonly no".to_owned(),
    ];
    match certs {
        Some(certs) => lines.extend([
            "port 0".to_owned(),
            format!("tls-port {port}"),
            format!("tls-cert-file {}", certs.server_cert.display()),
            format!("tls-key-file {}", certs.server_key.display()),
            format!("tls-ca-cert-file {}", certs.ca_cert.display()),
            "tls-auth-clients no".to_owned(),
        ]),
        None => lines.push(format!("port {port}")),
    }
    if let Some(password) = &opts.password {
        lines.push(format!("requirepass {password}"));
    }
    if let Some((name, master_port)) = &opts.monitor {
        lines.push(format!("sentinel monitor {name} 127.0.0.1 {master_port} 1"));
    }
    if let Some((name, password)) = &opts.user {
        lines.push(format!("user {name} on >{password} ~* &* +@all"));
    }
    lines.extend(opts.config.iter().cloned());
    lines.join("\n") + "\n"
}

/// A running private `redis-server`. Killed (with SIGKILL) when dropped, also when a test panics.
#[derive(Debug)]
pub struct RedisServer {
    dir: TempDir,
    conf_path: PathBuf,
    port: u16,
    certs: Option<TestCertificates>,
    userinfo: String,
    cli_auth: Option<(String, String)>,
    sentinel: bool,
    process: Option<Supervised>,
}

impl RedisServer {
    /// A plain redis-server with the harness defaults: no persistence, no password, no limits.
    pub fn start() -> Result<Self> {
        Self::builder().start()
    }

    pub fn builder() -> RedisBuilder {
        RedisBuilder::default()
    }

    /// `redis://[userinfo@]127.0.0.1:PORT/0`, `rediss://…` for a TLS server, `sentinel://…` for a
    /// Sentinel.
    pub fn url(&self) -> String {
        let scheme = match (self.sentinel, self.certs.is_some()) {
            (true, _) => "sentinel",
            (false, true) => "rediss",
            (false, false) => "redis",
        };
        format!("{scheme}://{}127.0.0.1:{}/0", self.userinfo, self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The CA certificate a client must trust to talk to a TLS server.
    pub fn ca_cert_path(&self) -> Option<&Path> {
        self.certs.as_ref().map(|c| c.ca_cert.as_path())
    }

    /// The server's temp dir (config, log, certificates).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `redis-cli` against this server (TLS and credentials handled) and returns its stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(ca) = self.ca_cert_path() {
            cmd.arg("--tls").arg("--cacert").arg(ca);
        }
        if let Some((user, password)) = &self.cli_auth {
            cmd.args(["--user", user]).env("REDISCLI_AUTH", password);
        }
        let out = cmd.args(args).stdin(Stdio::null()).output().map_err(io_err("run redis-cli"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(HarnessError::Command {
                what: format!("redis-cli {}", args.first().unwrap_or(&"")),
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        }
    }

    /// SIGKILLs the server (no shutdown, no save) — for broker-failure tests.
    pub fn kill(&mut self) {
        if let Some(process) = self.process.take() {
            process.kill();
        }
    }

    /// (Re)starts the server on the same port with the same config; waits until it accepts clients.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let log = self.dir.path().join("redis.log");
        let _ = std::fs::remove_file(&log);
        let mut cmd = Command::new("redis-server");
        cmd.arg(&self.conf_path).stdout(Stdio::null()).stderr(Stdio::null());
        if self.sentinel {
            cmd.arg("--sentinel");
        }
        let mut process = Supervised::spawn("redis-server", &mut cmd, Some(self.dir.path()))?;
        // A Sentinel logs no "ready" line; it listens before it starts monitoring.
        let ready_line = if self.sentinel { "+monitor master" } else { "Ready to accept connections" };
        let ready = wait_until("redis-server to accept connections", BOOT_TIMEOUT, || {
            if process.exited().is_some() {
                return Some(false);
            }
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.contains(ready_line).then_some(true)
        });
        match ready {
            Ok(true) => {
                self.process = Some(process);
                Ok(())
            }
            Ok(false) | Err(_) => Err(HarnessError::Command {
                what: format!("start redis-server on port {}", self.port),
                detail: std::fs::read_to_string(&log).unwrap_or_default(),
            }),
        }
    }
}
