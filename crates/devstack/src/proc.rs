//! Process plumbing: free ports, detached server processes, liveness and signals.

use std::{
    fs::OpenOptions,
    net::{TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill, killpg},
    unistd::Pid,
};

use crate::{DevstackError, Result, error::IoContext};

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").ctx(|| "binding an ephemeral port".into())?;
    Ok(l.local_addr()
        .ctx(|| "reading an ephemeral port".into())?
        .port())
}

/// Starts `cmd` in its own process group (so a terminal's Ctrl-C or the test harness does not hit it, and a
/// stop can signal the whole group), with stdout and stderr appended to `log`.
pub fn spawn_detached(mut cmd: Command, log: &Path) -> Result<Child> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .ctx(|| format!("opening {}", log.display()))?;
    let err = out.try_clone().ctx(|| "cloning log handle".into())?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    cmd.spawn()
        .ctx(|| format!("starting {:?}", cmd.get_program()))
}

/// Alive and not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(p) = i32::try_from(pid) else {
        return false;
    };
    if kill(Pid::from_raw(p), None).is_err() {
        return false;
    }
    // A dead child not yet reaped still answers signal 0; its state letter in /proc says Z.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(true),
        Err(_) => false,
    }
}

/// Whether something accepts connections at `host:port` (`host` an IP address).
pub fn port_open_on(host: &str, port: u16) -> bool {
    let Ok(ip) = host.parse::<std::net::IpAddr>() else {
        return false;
    };
    TcpStream::connect_timeout(&(ip, port).into(), Duration::from_millis(300)).is_ok()
}

/// The address servers listen on unless a profile says otherwise.
pub const LOOPBACK: &str = "127.0.0.1";

/// The default for the `host` of a server config (serde and struct defaults).
pub fn loopback() -> String {
    LOOPBACK.to_owned()
}

/// Sends `sig` to the process group led by `pid` (falls back to the process alone).
pub fn signal(pid: u32, sig: Signal) {
    if let Ok(p) = i32::try_from(pid)
        && killpg(Pid::from_raw(p), sig).is_err()
    {
        let _ = kill(Pid::from_raw(p), sig);
    }
}

/// Waits until `pid` is gone, reaping it through `child` when we are its parent.
pub async fn wait_gone(pid: u32, child: Option<&mut Child>, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut child = child;
    loop {
        if let Some(c) = child.as_deref_mut()
            && matches!(c.try_wait(), Ok(Some(_)))
        {
            return true;
        }
        if !pid_alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL.
pub async fn terminate(pid: u32, mut child: Option<&mut Child>, grace: Duration) {
    signal(pid, Signal::SIGTERM);
    if !wait_gone(pid, child.as_deref_mut(), grace).await {
        tracing::warn!(pid, "did not stop after SIGTERM; killing");
        signal(pid, Signal::SIGKILL);
        let _ = wait_gone(pid, child, Duration::from_secs(10)).await;
    }
}

/// Runs a command to completion, returning an error with its output when it fails.
pub fn run(mut cmd: Command, what: &str) -> Result<String> {
    let out = cmd.output().ctx(|| format!("running {what}"))?;
    if !out.status.success() {
        return Err(DevstackError::Command(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A server process: one we started (we hold its `Child` and reap it) or one we attached to by pid (started by
/// another process of the same profile).
#[derive(Debug, Default)]
pub(crate) struct ServerProcess {
    child: Option<Child>,
    pid: Option<u32>,
}

impl ServerProcess {
    pub(crate) fn attached(pid: u32) -> Self {
        Self {
            child: None,
            pid: Some(pid),
        }
    }

    pub(crate) fn spawned(child: Child) -> Self {
        Self {
            pid: Some(child.id()),
            child: Some(child),
        }
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.pid
    }

    pub(crate) fn running(&self) -> bool {
        self.pid.is_some_and(pid_alive)
    }

    /// The exit status, if a process we started has already exited.
    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub(crate) async fn stop(&mut self, grace: Duration) {
        if let Some(pid) = self.pid.take() {
            terminate(pid, self.child.as_mut(), grace).await;
        }
        self.child = None;
    }

    /// `kill -9`: no controlled shutdown, like a crash.
    pub(crate) fn kill(&mut self) {
        if let Some(pid) = self.pid.take() {
            signal(pid, Signal::SIGKILL);
            if let Some(c) = self.child.as_mut() {
                let _ = c.wait();
            }
        }
        self.child = None;
    }
}

/// Removes a server's directory; a directory that is already gone is fine.
pub(crate) fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DevstackError::Io {
            what: format!("removing {}", dir.display()),
            source: e,
        }),
        _ => Ok(()),
    }
}
