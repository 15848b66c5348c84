//! A private RabbitMQ node (own node name, ports and directories) with the management plugin and
//! a TLS listener (certificates from a throw-away CA, see [`RabbitServer::ca_cert_path`]).
//!
//! The node runs as the invoking user straight from `/usr/lib/rabbitmq/bin` (the Debian wrapper in
//! `/usr/sbin` would switch to the `rabbitmq` user and reset `HOME`), with every directory, the Erlang
//! cookie and a blank `rabbitmq-env.conf` in one temp dir, so the machine's own node is never touched.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use tempfile::TempDir;

use crate::process::Supervised;
use crate::{HarnessError, Result, TestCertificates, free_port, io_err};

const RABBIT_BIN: &str = "/usr/lib/rabbitmq/bin";
const BOOT_TIMEOUT_SECS: u32 = 90;

/// A running private RabbitMQ node; user `guest`/`guest` may connect over loopback. Killed when dropped.
/// Its management statistics refresh every 500 ms (RabbitMQ's default is 5 s) so tests of
/// management-API readers wait less.
#[derive(Debug)]
pub struct RabbitServer {
    dir: TempDir,
    node: String,
    amqp_port: u16,
    amqps_port: u16,
    certs: TestCertificates,
    management_port: u16,
    _process: Supervised,
}

impl RabbitServer {
    /// Boots a new node (about 5 s) and waits until RabbitMQ and its plugins run.
    pub fn start() -> Result<Self> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir =
            tempfile::Builder::new().prefix("rabbit-test-").tempdir().map_err(io_err("create rabbitmq temp dir"))?;
        let node = format!("t{}-{}@localhost", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let (amqp_port, amqps_port, management_port, dist_port) = (free_port(), free_port(), free_port(), free_port());
        let certs = TestCertificates::generate(dir.path())?;
        write_node_files(dir.path(), &certs, [amqp_port, amqps_port, management_port])?;
        let mut cmd = Command::new(Path::new(RABBIT_BIN).join("rabbitmq-server"));
        node_env(&mut cmd, dir.path(), &node)
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .current_dir(dir.path())
            .stdout(log_file(dir.path(), "stdout.log")?)
            .stderr(log_file(dir.path(), "stderr.log")?);
        let process = Supervised::spawn("rabbitmq-server", &mut cmd, Some(dir.path()))?;
        let server = Self { dir, node, amqp_port, amqps_port, certs, management_port, _process: process };
        let pid_file = server.dir.path().join("rabbit.pid");
        let timeout = BOOT_TIMEOUT_SECS.to_string();
        let pid_arg = pid_file.to_string_lossy();
        server.ctl(&["wait", &pid_arg, "--timeout", &timeout]).map_err(|e| HarnessError::Command {
            what: format!("boot RabbitMQ node {}", server.node),
            detail: format!("{e}\n{}", server.log_tail()),
        })?;
        Ok(server)
    }

    /// One node per test binary, booted on first use and killed (its temp dir removed) when the test
    /// binary exits. Tests sharing it must use their own queue names or vhosts.
    pub fn shared() -> Result<&'static Self> {
        static SHARED: OnceLock<Result<RabbitServer, String>> = OnceLock::new();
        SHARED.get_or_init(|| Self::start().map_err(|e| e.to_string())).as_ref().map_err(|detail| {
            HarnessError::Command { what: "boot the shared RabbitMQ node".into(), detail: detail.clone() }
        })
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2F` (the default vhost `/`).
    pub fn amqp_url(&self) -> String {
        self.amqp_url_for_vhost("/")
    }

    /// The AMQP URL for `vhost` (percent-encoded, so `/` becomes `%2F`).
    pub fn amqp_url_for_vhost(&self, vhost: &str) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/{}", self.amqp_port, encode_vhost(vhost))
    }

    /// `http://guest:guest@127.0.0.1:PORT` — the management API root (append `/api/...`).
    pub fn management_url(&self) -> String {
        format!("http://guest:guest@127.0.0.1:{}", self.management_port)
    }

    /// `amqps://guest:guest@127.0.0.1:PORT/%2F`: the same node over TLS; trust
    /// [`ca_cert_path`](Self::ca_cert_path).
    pub fn amqps_url(&self) -> String {
        format!("amqps://guest:guest@127.0.0.1:{}/%2F", self.amqps_port)
    }

    /// The CA that signed the node's TLS certificate (for 127.0.0.1 and localhost).
    pub fn ca_cert_path(&self) -> &Path {
        &self.certs.ca_cert
    }

    pub fn amqp_port(&self) -> u16 {
        self.amqp_port
    }

    pub fn management_port(&self) -> u16 {
        self.management_port
    }

    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// Creates `vhost` and gives `guest` full permissions on it (takes a second or two: the CLI boots
    /// an Erlang VM).
    pub fn add_vhost(&self, vhost: &str) -> Result<()> {
        self.ctl(&["add_vhost", vhost])?;
        self.ctl(&["set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"])?;
        Ok(())
    }

    /// Runs `rabbitmqctl -n NODE <args>` against this node and returns its stdout.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(Path::new(RABBIT_BIN).join("rabbitmqctl"));
        let out = node_env(&mut cmd, self.dir.path(), &self.node)
            .args(["-n", &self.node])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(io_err("run rabbitmqctl"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(HarnessError::Command {
                what: format!("rabbitmqctl {}", args.join(" ")),
                detail: format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
            })
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("stdout.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// Percent-encodes a vhost for an AMQP URL path segment.
fn encode_vhost(vhost: &str) -> String {
    vhost
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn write_node_files(dir: &Path, certs: &TestCertificates, [amqp, amqps, management]: [u16; 3]) -> Result<()> {
    for sub in ["mnesia", "log", "home"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(io_err("create rabbitmq dirs"))?;
    }
    let files = [
        (
            "rabbitmq.conf",
            format!(
                "listeners.tcp.default = 127.0.0.1:{amqp}\n\
                 listeners.ssl.default = 127.0.0.1:{amqps}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n\
                 management.tcp.ip = 127.0.0.1\n\
                 management.tcp.port = {management}\n\
                 loopback_users = none\n\
                 collect_statistics_interval = 500\n",
                certs.ca_cert.display(),
                certs.server_cert.display(),
                certs.server_key.display(),
            ),
        ),
        ("enabled_plugins", "[rabbitmq_management].\n".to_owned()),
        // Replaces /etc/rabbitmq/rabbitmq-env.conf, which names the machine's own node.
        ("rabbitmq-env.conf", "ERL_EPMD_ADDRESS=127.0.0.1\n".to_owned()),
    ];
    for (name, text) in files {
        std::fs::write(dir.join(name), text).map_err(io_err(format!("write {name}")))?;
    }
    Ok(())
}

fn node_env<'c>(cmd: &'c mut Command, dir: &Path, node: &str) -> &'c mut Command {
    let path = |name: &str| -> PathBuf { dir.join(name) };
    cmd.env("RABBITMQ_NODENAME", node)
        .env("RABBITMQ_CONF_ENV_FILE", path("rabbitmq-env.conf"))
        .env("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf"))
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins"))
        .env("RABBITMQ_MNESIA_BASE", path("mnesia"))
        .env("RABBITMQ_LOG_BASE", path("log"))
        .env("RABBITMQ_PID_FILE", path("rabbit.pid"))
        .env("RABBITMQ_FEATURE_FLAGS_FILE", path("feature_flags"))
        .env("HOME", path("home"))
}

fn log_file(dir: &Path, name: &str) -> Result<std::fs::File> {
    std::fs::File::create(dir.join(name)).map_err(io_err(format!("create {name}")))
}

#[cfg(test)]
mod tests {
    use super::encode_vhost;

    #[test]
    fn vhosts_are_percent_encoded_for_amqp_urls() {
        assert_eq!(encode_vhost("/"), "%2F");
        assert_eq!(encode_vhost("team a/b"), "team%20a%2Fb");
        assert_eq!(encode_vhost("plain-1"), "plain-1");
    }
}
