//! Running commands with a bounded time, and errors that show what was run and what it said.
//!
//! [`command`] is the one place in the workspace where a process is started (the test
//! `every_spawned_command_is_listed` holds every other file to that): it refuses any command
//! that `tools.txt` does not list, so a new dependency on a system tool cannot go unnoticed by
//! `./x setup`. The project's own binaries (sluice, test binaries) are started by path.
use std::{
    ffi::OsStr,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::tools;

#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error(
        "could not start `{cmd}`: {source} (is it installed? `./x setup` installs everything in \
         tools.txt)"
    )]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    /// A system call made in place of a command (`mount(2)` for `mount`).
    #[error("`{call}` failed: {source}")]
    Syscall {
        call: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` did not finish within {timeout:?} and was killed")]
    Timeout { cmd: String, timeout: Duration },
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Failed {
        cmd: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error(
        "`{program}` (in `{cmd}`) is not in tools.txt, the list of every command sluice runs: \
         add a row for it with the Debian package that provides it, so that `./x setup` \
         installs it"
    )]
    Unlisted { cmd: String, program: String },
    #[error(
        "`{cmd}` starts a program by path: name a command from tools.txt instead (only the \
         workspace's own binaries, under its target directory, and the tools setup built into \
         its cache are started by path)"
    )]
    ByPath { cmd: String },
    #[error("waiting for `{cmd}` failed: {source}")]
    Wait {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
}

/// A [`Command`] for `argv` (program and arguments), refused unless every program it runs is
/// listed in `tools.txt`: `argv[0]`, and for `ip netns exec NS PROG ...` also `PROG`. A program
/// given by path must be one of the workspace's own binaries (see [`is_own_binary`]).
pub fn command<S: AsRef<OsStr>>(argv: &[S]) -> Result<Command, CmdError> {
    let words: Vec<&str> = argv
        .iter()
        .map(|a| a.as_ref().to_str().unwrap_or("\u{fffd}"))
        .collect();
    let cmd = words.join(" ");
    let Some(&program) = words.first() else {
        return Err(CmdError::Unlisted {
            cmd,
            program: String::new(),
        });
    };
    check_program(program, &cmd)?;
    // `ip netns exec NS PROG ...` runs PROG: it must be listed too.
    if let ["ip", "netns", "exec", _, inner, ..] = words.as_slice() {
        check_program(inner, &cmd)?;
    }
    let mut c = Command::new(argv[0].as_ref());
    c.args(&argv[1..]);
    // A namespace given a cgroup (a sandbox node's or pod's): its processes start in it.
    if let ["ip", "netns", "exec", ns, ..] = words.as_slice()
        && let Some(cgroup) = crate::cgroup::assigned(ns)
    {
        let procs = cgroup.join("cgroup.procs");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .map_err(|source| CmdError::Spawn {
                cmd: format!("{cmd} (joining {})", procs.display()),
                source,
            })?;
        // SAFETY: between fork and exec the child only calls write(2), which is
        // async-signal-safe, on a descriptor opened before the fork. "0" moves the writer.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut c, move || {
                use std::os::fd::AsRawFd as _;
                if libc::write(file.as_raw_fd(), b"0".as_ptr().cast(), 1) == 1 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    Ok(c)
}

fn check_program(program: &str, cmd: &str) -> Result<(), CmdError> {
    if program.contains('/') {
        return if is_own_binary(Path::new(program)) || is_built_tool(Path::new(program)) {
            Ok(())
        } else {
            Err(CmdError::ByPath {
                cmd: cmd.to_owned(),
            })
        };
    }
    match tools::find(program) {
        Some(_) => Ok(()),
        None => Err(CmdError::Unlisted {
            cmd: cmd.to_owned(),
            program: program.to_owned(),
        }),
    }
}

/// Where cargo puts this workspace's builds: `$CARGO_TARGET_DIR`, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// Whether `path` is one of the workspace's own binaries: under its target directory.
pub fn is_own_binary(path: &Path) -> bool {
    let canon = |p: &Path| std::fs::canonicalize(p).ok();
    match (canon(path), canon(&target_dir())) {
        (Some(p), Some(t)) => p.starts_with(t),
        _ => false,
    }
}

/// Whether `path` is a tool `./x setup` built or fetched into the cache (the control plane,
/// Go, virtme-ng and its virtualenv's pip), one that `tools.txt` lists by that name.
pub fn is_built_tool(path: &Path) -> bool {
    let listed = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(tools::find)
        .is_some();
    let cache = std::fs::canonicalize(crate::controlplane::versions::cache_dir());
    listed
        && matches!(
            (std::fs::canonicalize(path), cache),
            (Ok(p), Ok(c)) if p.starts_with(&c)
        )
}

/// A [`Command`] for a copy of one of the workspace's own binaries placed elsewhere (a test
/// binary copied where another user may run it). Never a system command.
pub fn own_binary_copy(path: &Path) -> Command {
    Command::new(path)
}

/// Runs `argv`, killing it after `timeout`; returns its output whether or not it succeeded.
pub fn output(argv: &[&str], timeout: Duration) -> Result<Output, CmdError> {
    output_with_input(argv, None, timeout)
}

/// [`output`] with `input` written to the command's stdin (closed after it); `None`: stdin is
/// /dev/null.
pub fn output_with_input(
    argv: &[&str],
    input: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Output, CmdError> {
    let cmd = argv.join(" ");
    let mut child = command(argv)?
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| CmdError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    // Feed stdin on a thread too: a child that writes before it has read all of its input
    // must not wait on us while we wait on it. A child that exits early (an error) closes
    // the pipe; its status says why, so the write error is ignored.
    let in_t = input.map(|bytes| {
        let mut stdin = child.stdin.take().expect("stdin is piped");
        std::thread::spawn(move || {
            use std::io::Write as _;
            let _ = stdin.write_all(&bytes);
        })
    });
    // Drain the pipes on threads so a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take().expect("stdout is piped");
    let mut err = child.stderr.take().expect("stderr is piped");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CmdError::Timeout { cmd, timeout });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(source) => return Err(CmdError::Wait { cmd, source }),
        }
    };
    if let Some(t) = in_t {
        let _ = t.join();
    }
    Ok(Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    })
}

/// Runs `argv` within `timeout` and returns its stdout; a non-zero exit is an error that
/// carries stderr.
pub fn run_timeout(argv: &[&str], timeout: Duration) -> Result<String, CmdError> {
    stdout_of(argv, output(argv, timeout)?)
}

/// `out`'s stdout if `argv` succeeded; else an error carrying its stderr.
pub(crate) fn stdout_of(argv: &[&str], out: Output) -> Result<String, CmdError> {
    if !out.status.success() {
        return Err(CmdError::Failed {
            cmd: argv.join(" "),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`run_timeout`] with the default bound for set-up commands (10 s).
pub fn run(argv: &[&str]) -> Result<String, CmdError> {
    run_timeout(argv, Duration::from_secs(10))
}

/// Whether `cmd` is an executable file on PATH (or in the sbin directories, which a non-root
/// PATH often lacks).
pub fn on_path(cmd: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(Into::into))
        .any(|dir| {
            std::fs::metadata(dir.join(cmd)).is_ok_and(|m| {
                m.is_file()
                    && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_path_finds_an_installed_tool_and_not_a_missing_one() {
        assert!(on_path("sh"), "sh is on every PATH");
        assert!(!on_path("sluice-no-such-tool"));
        // A directory of that name is not a tool.
        assert!(!on_path(""));
    }

    #[test]
    fn a_listed_command_is_built_with_its_arguments() {
        let c = command(&["ip", "-n", "ns1", "link"]).unwrap();
        assert_eq!(c.get_program(), "ip");
        assert_eq!(c.get_args().collect::<Vec<_>>(), ["-n", "ns1", "link"]);
    }

    #[test]
    fn an_unlisted_command_is_refused_before_it_runs() {
        match command(&["telnet", "get", "pods"]) {
            Err(CmdError::Unlisted { program, cmd }) => {
                assert_eq!(
                    (program.as_str(), cmd.as_str()),
                    ("telnet", "telnet get pods")
                );
            }
            other => panic!("expected Unlisted, got {other:?}"),
        }
        // The error says where the list is and what to do.
        let msg = command(&["telnet"]).unwrap_err().to_string();
        assert!(
            msg.contains("tools.txt") && msg.contains("Debian package"),
            "{msg}"
        );
        assert!(matches!(
            command::<&str>(&[]),
            Err(CmdError::Unlisted { .. })
        ));
    }

    #[test]
    fn the_program_that_ip_netns_exec_runs_must_be_listed_too() {
        assert!(command(&["ip", "netns", "exec", "ns1", "curl", "-s"]).is_ok());
        match command(&["ip", "netns", "exec", "ns1", "tcpdump", "-i", "eth0"]) {
            Err(CmdError::Unlisted { program, .. }) => assert_eq!(program, "tcpdump"),
            other => panic!("expected Unlisted, got {other:?}"),
        }
    }

    #[test]
    fn only_the_workspaces_own_binaries_run_by_path() {
        assert!(matches!(
            command(&["/usr/bin/curl", "-s"]),
            Err(CmdError::ByPath { .. })
        ));
        // This test binary lives under the target directory.
        let me = std::env::current_exe().unwrap();
        assert!(
            is_own_binary(&me),
            "{} is not under {}",
            me.display(),
            target_dir().display()
        );
        assert!(command(&[me.as_os_str(), OsStr::new("--list")]).is_ok());
        assert!(command(&["ip", "netns", "exec", "ns1", me.to_str().unwrap()]).is_ok());
    }
}
