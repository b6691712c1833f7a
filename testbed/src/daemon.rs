//! A long-running process started inside a namespace (an agent, etcd, the API server), its
//! stdout and stderr going to a log file; killed by its own pid, and reaped, on drop, when its
//! log file goes too (failure messages quote the log while the process is there).
use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use crate::{
    cmd::{self, CmdError},
    netns::Netns,
};

#[derive(Debug)]
pub struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `argv` in `ns` with `env` added to its environment, logging to `log`.
    pub fn start(
        ns: &Netns,
        argv: &[&str],
        env: &[(&str, &str)],
        log: &Path,
    ) -> Result<Self, CmdError> {
        let full = ns.exec_argv(argv);
        let spawn_err = |source| CmdError::Spawn {
            cmd: full.join(" "),
            source,
        };
        let out = File::create(log).map_err(spawn_err)?;
        let err = out.try_clone().map_err(spawn_err)?;
        let mut command = cmd::command(&full)?;
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(spawn_err)?;
        Ok(Self {
            child,
            log: log.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `bytes` of its log (the end says why it failed).
    pub fn log_tail(&self, bytes: usize) -> String {
        let text = self.log();
        let start = text.ceil_char_boundary(text.len().saturating_sub(bytes));
        text[start..].to_owned()
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, as a crash or an OOM kill would do, and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the exit; returns whether it exited by itself within `timeout`
    /// (else it is killed).
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}
