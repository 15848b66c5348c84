//! The Python virtualenv with real Celery from PyPI, and processes running in it.
//!
//! The venv lives in `$CELERY_VENV` if set, else `<workspace>/target/celery-venv`. It is installed from
//! `worker-image/requirements.txt` (the worker image's pins) or, while that file does not exist, from
//! [`FALLBACK_REQUIREMENTS`]. Creation is guarded by an exclusive file lock so concurrent test binaries
//! don't race, and the venv is reused while the requirements text is unchanged (it is stored in the
//! venv as a stamp). A venv at `$CELERY_VENV` without a stamp is the user's own: used as is, never
//! rebuilt.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::process::Supervised;
use crate::{HarnessError, Result, io_err, wait_until};

/// Pins used when `worker-image/requirements.txt` does not exist (py-amqp comes with kombu).
pub const FALLBACK_REQUIREMENTS: &str = "celery[redis]==5.7.0\n";

const STAMP: &str = ".harness-requirements";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The venv's directory, creating or refreshing it on first use in this process.
pub fn celery_venv() -> Result<&'static Path> {
    static VENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    VENV.get_or_init(|| prepare_venv().map_err(|e| e.to_string()))
        .as_deref()
        .map_err(|detail| HarnessError::Command { what: "prepare the Celery venv".into(), detail: detail.clone() })
}

/// `<venv>/bin/<program>` (e.g. `python`, `celery`).
pub fn venv_bin(program: &str) -> Result<PathBuf> {
    Ok(celery_venv()?.join("bin").join(program))
}

fn prepare_venv() -> Result<PathBuf> {
    let venv = std::env::var_os("CELERY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/celery-venv"));
    let requirements_file = workspace_root().join("worker-image/requirements.txt");
    let requirements = std::fs::read_to_string(&requirements_file).unwrap_or_else(|_| FALLBACK_REQUIREMENTS.to_owned());

    if let Some(parent) = venv.parent() {
        std::fs::create_dir_all(parent).map_err(io_err("create the venv's parent dir"))?;
    }
    let lock = File::create(venv.with_extension("lock")).map_err(io_err("create venv lock"))?;
    lock.lock().map_err(io_err("lock the venv"))?;

    let stamp = std::fs::read_to_string(venv.join(STAMP)).ok();
    let user_managed = stamp.is_none() && std::env::var_os("CELERY_VENV").is_some() && venv.join("bin/python").exists();
    if user_managed || stamp.as_deref() == Some(requirements.as_str()) {
        return Ok(venv);
    }

    tracing::info!(venv = %venv.display(), "creating the Celery venv");
    let _ = std::fs::remove_dir_all(&venv);
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    run("python3 -m venv", Command::new(python).args(["-m", "venv"]).arg(&venv))?;
    let pinned = venv.join("requirements.txt");
    std::fs::write(&pinned, &requirements).map_err(io_err("write requirements"))?;
    let from = if requirements_file.exists() { requirements_file } else { pinned };
    run(
        "pip install the Celery requirements",
        Command::new(venv.join("bin/pip")).args(["install", "--disable-pip-version-check", "-q", "-r"]).arg(from),
    )?;
    std::fs::write(venv.join(STAMP), &requirements).map_err(io_err("write venv stamp"))?;
    Ok(venv)
}

fn run(what: &str, cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().map_err(io_err(what.to_owned()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(HarnessError::Command {
            what: what.to_owned(),
            detail: format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        })
    }
}

/// Runs `code` with the venv's Python (`python -c code`, extra `env` set) and returns its stdout;
/// a non-zero exit is an error carrying stdout and stderr.
pub fn run_script(code: &str, env: &[(&str, &str)]) -> Result<String> {
    let mut cmd = Command::new(venv_bin("python")?);
    cmd.arg("-c").arg(code);
    for (key, value) in env {
        cmd.env(key, value);
    }
    run("python script", &mut cmd)
}

/// A real `celery` process from the venv (e.g. a worker), run in `app_dir` with `PYTHONPATH=app_dir`,
/// output captured to a log file in `app_dir`. Its whole process group (the prefork pool too) is
/// killed on drop.
#[derive(Debug)]
pub struct CeleryWorker {
    process: Supervised,
    log: PathBuf,
}

impl CeleryWorker {
    /// Starts `celery <args>`, e.g. `["-A", "tasks", "worker", "-Q", "emails", "-c", "1"]`.
    pub fn spawn(app_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        let log = app_dir.join(format!("celery-{}.log", crate::free_port()));
        let out = File::create(&log).map_err(io_err("create celery log"))?;
        let err = out.try_clone().map_err(io_err("clone celery log"))?;
        let mut cmd = Command::new(venv_bin("celery")?);
        cmd.args(args)
            .current_dir(app_dir)
            .env("PYTHONPATH", app_dir)
            .env("PYTHONUNBUFFERED", "1")
            .stdout(out)
            .stderr(err);
        for (key, value) in env {
            cmd.env(key, value);
        }
        let process = Supervised::spawn("celery", &mut cmd, None)?;
        Ok(Self { process, log })
    }

    /// Waits until the log contains `needle` (a worker started with `-l INFO` logs `ready.` once it consumes). Fails early,
    /// with the log, if the process exits.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let log = &self.log;
        let process = &mut self.process;
        let found = wait_until(&format!("celery to log {needle:?}"), timeout, || {
            if std::fs::read_to_string(log).is_ok_and(|t| t.contains(needle)) {
                Some(true)
            } else {
                process.exited().map(|_| false)
            }
        });
        match found {
            Ok(true) => Ok(()),
            Ok(false) => Err(HarnessError::Command {
                what: format!("celery exited before logging {needle:?}"),
                detail: self.log(),
            }),
            Err(HarnessError::Timeout { what, after, .. }) => {
                Err(HarnessError::Timeout { what, after, detail: format!("; log:\n{}", self.log()) })
            }
            Err(e) => Err(e),
        }
    }

    /// Everything the process printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Sends SIGTERM to the main process (Celery's warm shutdown) and waits for it to exit.
    pub fn terminate(mut self, timeout: Duration) -> Result<ExitStatus> {
        self.process.signal_leader("TERM")?;
        self.process.wait_exit(timeout)
    }
}
