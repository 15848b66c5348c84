//! A child process in its own process group, killed with its whole group when dropped — or, through a
//! reaper, when the test binary dies without unwinding (SIGKILL, abort, a static never dropped).

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::{HarnessError, Result, io_err, wait_until};

/// The reaper blocks reading a pipe only this process writes to. When a line arrives (a normal drop)
/// or the pipe closes (the kernel closed it because the test binary died) it kills the group; only in
/// the second case does it also remove `$1`, which no destructor will clean up any more.
const REAPER: &str =
    r#"read -r how; kill -KILL "-$0" 2>/dev/null; [ "$how" = dropped ] || [ -z "$1" ] || rm -rf -- "$1""#;

pub(crate) struct Supervised {
    what: String,
    child: Child,
    reaper: Option<(Child, ChildStdin)>,
}

impl Supervised {
    /// Spawns `cmd` as the leader of a new process group. `remove_on_orphan` is deleted by the reaper
    /// only when the test binary died without dropping us (a normal drop leaves it to its owner).
    pub(crate) fn spawn(what: &str, cmd: &mut Command, remove_on_orphan: Option<&Path>) -> Result<Self> {
        let child = cmd.process_group(0).stdin(Stdio::null()).spawn().map_err(io_err(format!("spawn {what}")))?;
        let mut reaper = Command::new("sh")
            .arg("-c")
            .arg(REAPER)
            .arg(child.id().to_string())
            .arg(remove_on_orphan.map(PathBuf::from).unwrap_or_default())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io_err(format!("spawn reaper for {what}")))?;
        let pipe = reaper.stdin.take().expect("piped stdin");
        Ok(Self { what: what.to_owned(), child, reaper: Some((reaper, pipe)) })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once the leader has exited.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends `signal` (a `kill -s` name such as `TERM`) to the leader only.
    pub(crate) fn signal_leader(&self, signal: &str) -> Result<()> {
        let status = Command::new("kill")
            .args(["-s", signal, "--", &self.child.id().to_string()])
            .status()
            .map_err(io_err("run kill"))?;
        if status.success() {
            Ok(())
        } else {
            Err(HarnessError::Command { what: format!("kill -s {signal} {}", self.what), detail: status.to_string() })
        }
    }

    /// Waits for the leader to exit on its own (e.g. after a graceful stop request).
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let what = format!("{} to exit", self.what);
        let child = &mut self.child;
        wait_until(&what, timeout, || child.try_wait().ok().flatten())
    }

    /// SIGKILLs the whole group and reaps the leader.
    pub(crate) fn kill(mut self) {
        self.kill_group();
    }

    fn kill_group(&mut self) {
        // Closing the pipe makes the reaper kill the group; the leader is not reaped before that, so
        // its pid (= the group id) cannot have been reused by the time the reaper signals it.
        if let Some((mut reaper, mut pipe)) = self.reaper.take() {
            let _ = pipe.write_all(b"dropped\n");
            drop(pipe);
            let _ = reaper.wait();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl std::fmt::Debug for Supervised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervised").field("pid", &self.pid()).finish()
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.kill_group();
    }
}
