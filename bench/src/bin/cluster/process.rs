//! A storage node in an OS process of its own: this binary re-executed in
//! the node role (see [`ROLE_ENV`]) on a configuration file, its stderr in
//! a log file; killed (SIGKILL), frozen (SIGSTOP) and thawed (SIGCONT).
//!
//! Whatever happens, nothing is left behind: dropping a [`NodeProcess`]
//! kills and reaps it, dropping a [`Frozen`] guard sends SIGCONT. CPU time
//! is read from `/proc`, so this runs on Linux only.

use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The environment variable that makes this binary a storage node
/// (`caskade_node::main` parses the process's arguments with clap, which
/// would refuse a `node` subcommand before `--config`).
pub const ROLE_ENV: &str = "CASKADE_BENCH_ROLE";
/// Its value for a storage node.
pub const NODE_ROLE: &str = "node";

/// How long a node process may take to accept connections.
const LISTEN_DEADLINE: Duration = Duration::from_secs(30);
/// Pause between two connection attempts.
const LISTEN_POLL: Duration = Duration::from_millis(10);
/// Log lines shown when a node fails to start.
const LOG_TAIL_LINES: usize = 30;
/// `/proc/<pid>/stat` counts CPU time in clock ticks of 1/100 s (Linux's
/// `USER_HZ`, fixed whatever the kernel's internal tick rate).
const TICKS_PER_SEC: f64 = 100.0;

/// A running node process; dropping it kills and reaps it.
#[derive(Debug)]
pub struct NodeProcess {
    child: Child,
}

impl NodeProcess {
    /// Starts this binary as a node on `config`, stderr appended to `log`.
    pub fn spawn(config: &Path, log: &Path) -> anyhow::Result<NodeProcess> {
        let exe = std::env::current_exe().context("finding this binary")?;
        let stderr = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        // A clean environment: the caller's CASKADE_NODE_* variables would
        // override the file.
        let child = Command::new(exe)
            .arg("--config")
            .arg(config)
            .env_clear()
            .env(ROLE_ENV, NODE_ROLE)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting a node on {}", config.display()))?;
        Ok(NodeProcess { child })
    }

    /// Waits until the node accepts connections on `addr`; fails if it
    /// exits first (with the end of `log`) or takes too long.
    pub async fn wait_listening(&mut self, addr: SocketAddr, log: &Path) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the node on {addr} exited with {status} before listening; its log ends:\n{}",
                    tail(log)
                );
            }
            if started.elapsed() > LISTEN_DEADLINE {
                bail!("the node on {addr} is not listening after {LISTEN_DEADLINE:?}");
            }
            tokio::time::sleep(LISTEN_POLL).await;
        }
    }

    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and reaps it.
    pub fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process frozen with SIGSTOP; SIGCONT on [`Frozen::thaw`] or drop, so
/// that an error does not leave it stopped.
#[derive(Debug)]
pub struct Frozen {
    pid: Option<u32>,
}

impl Frozen {
    /// Sends SIGSTOP to `pid`.
    pub fn freeze(pid: u32) -> anyhow::Result<Frozen> {
        signal("STOP", pid)?;
        Ok(Frozen { pid: Some(pid) })
    }

    /// Sends SIGCONT.
    pub fn thaw(mut self) -> anyhow::Result<()> {
        match self.pid.take() {
            Some(pid) => signal("CONT", pid),
            None => Ok(()),
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = signal("CONT", pid);
        }
    }
}

/// Sends SIG`name` to `pid` with kill(1) (the workspace forbids the
/// `unsafe` a direct `kill(2)` would need).
fn signal(name: &str, pid: u32) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{name} {pid} failed with {status}");
    }
    Ok(())
}

/// CPU time (user and system) process `pid` has used so far; `None` for
/// this process.
pub fn cpu_time(pid: Option<u32>) -> anyhow::Result<Duration> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) is in parentheses and may hold spaces:
    // count fields after its closing one. Field 3 (state) comes first,
    // so utime (field 14) and stime (field 15) are the 12th and 13th.
    let after_name = stat
        .rsplit_once(')')
        .with_context(|| format!("{path}: no command name"))?
        .1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |n: usize| -> anyhow::Result<u64> {
        fields
            .get(n)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("{path}: field {} is not a tick count", n + 3))
    };
    let ticks = ticks(11)? + ticks(12)?;
    Ok(Duration::from_secs_f64(ticks as f64 / TICKS_PER_SEC))
}

/// `n` distinct loopback ports that were free a moment ago (the listeners
/// are held until all are chosen, so the OS gives different ones).
pub fn free_ports(n: usize) -> anyhow::Result<Vec<SocketAddr>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(listeners
        .iter()
        .map(std::net::TcpListener::local_addr)
        .collect::<Result<Vec<_>, _>>()?)
}

/// The last [`LOG_TAIL_LINES`] lines of `log`.
pub fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}
