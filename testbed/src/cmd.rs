//! Running commands with a bounded time, and errors that show what was run and what it said.
use std::{
    io::Read as _,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("could not start `{cmd}`: {source} (is it installed? `cargo xtask setup` installs it)")]
    Spawn {
        cmd: String,
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
    #[error("waiting for `{cmd}` failed: {source}")]
    Wait {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
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
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
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
