//! A storage node in a process of its own, for crash tests: started from a
//! [`NodeConfig`] passed as `CASKADE_NODE_*` environment variables (the
//! same overrides an operator uses), stopped with SIGTERM or killed with
//! SIGKILL, its log kept in a file beside its data directory, at the level
//! `CASKADE_TEST_NODE_LOG` names (`info` by default).

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use caskade_node::NodeConfig;
use caskade_node::config::DurabilityMode;

/// How long a node process may take to exit after SIGTERM.
const EXIT_DEADLINE: Duration = Duration::from_secs(20);
/// How long a node process may take to accept connections.
const LISTEN_DEADLINE: Duration = Duration::from_secs(30);

/// A running `caskade-node` process. Dropping it kills and reaps it, so a
/// failing test leaves nothing behind.
#[derive(Debug)]
pub struct NodeProcess {
    child: Child,
    /// The node's log file.
    pub log: PathBuf,
}

impl NodeProcess {
    /// Starts `binary` for `config` (whose `listen` must name a port),
    /// through `launcher` if it is not empty (a command that runs its
    /// arguments, such as `ip netns exec NAME`), and waits until it accepts
    /// connections.
    pub async fn start(
        launcher: &[std::ffi::OsString],
        binary: &Path,
        config: &NodeConfig,
    ) -> anyhow::Result<NodeProcess> {
        if config.listen.port() == 0 {
            bail!("a node process needs a fixed port");
        }
        let log = config.data_dir.with_extension("log");
        let stderr = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let mut command = match launcher.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        let child = command
            .env_clear()
            .envs(environment(config))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut process = NodeProcess { child, log };
        process.wait_listening(config.listen).await?;
        Ok(process)
    }

    async fn wait_listening(&mut self, addr: SocketAddr) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "node process exited with {status}; log: {}",
                    self.log.display()
                );
            }
            if started.elapsed() > LISTEN_DEADLINE {
                bail!("node process not listening on {addr} after {LISTEN_DEADLINE:?}");
            }
            tokio::time::sleep(crate::cluster::POLL_INTERVAL).await;
        }
    }

    /// SIGKILL: the process dies at once, as in a crash (its files stay as
    /// they are; the OS keeps what it has been handed).
    pub fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to the process.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()?;
        if !sent.success() {
            bail!("kill -{signal} failed");
        }
        Ok(())
    }

    /// SIGTERM, then waits for a clean exit.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()?;
        if !sent.success() {
            bail!("kill -TERM failed");
        }
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("node exited with {status}; log: {}", self.log.display());
                }
                return Ok(());
            }
            if started.elapsed() > EXIT_DEADLINE {
                bail!("node did not exit within {EXIT_DEADLINE:?} of SIGTERM");
            }
            tokio::time::sleep(crate::cluster::POLL_INTERVAL).await;
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `config` as the environment variables that set it.
fn environment(config: &NodeConfig) -> Vec<(String, String)> {
    let path = |p: &Path| p.display().to_string();
    let durability = match config.engine.durability {
        DurabilityMode::Always => "always",
        DurabilityMode::Interval => "interval",
        DurabilityMode::Never => "never",
    };
    let mut vars = vec![
        ("ID", config.id.to_string()),
        ("LISTEN", config.listen.to_string()),
        ("DATA_DIR", path(&config.data_dir)),
        ("TLS__CA", path(&config.tls.ca)),
        ("TLS__CERT", path(&config.tls.cert)),
        ("TLS__KEY", path(&config.tls.key)),
        ("ENGINE__DURABILITY", durability.into()),
        (
            "ENGINE__MAX_FILE_SIZE",
            config.engine.max_file_size.to_string(),
        ),
        (
            "ENGINE__MERGE__TOMBSTONE_RETENTION_SECS",
            config.engine.merge.tombstone_retention_secs.to_string(),
        ),
        (
            "REPLICATION__PULL_MAX_RECORDS",
            config.replication.pull_max_records.to_string(),
        ),
        (
            "REPLICATION__ACK_TIMEOUT_MS",
            config.replication.ack_timeout_ms.to_string(),
        ),
        (
            "REPLICATION__ANTI_ENTROPY_INTERVAL_MS",
            config.replication.anti_entropy_interval_ms.to_string(),
        ),
        (
            "SERVER__SHUTDOWN_GRACE_SECS",
            config.server.shutdown_grace_secs.to_string(),
        ),
        ("LOG__FORMAT", "json".into()),
        (
            "LOG__LEVEL",
            std::env::var("CASKADE_TEST_NODE_LOG").unwrap_or_else(|_| "info".into()),
        ),
    ];
    if let Some(dir) = &config.backup_dir {
        vars.push(("BACKUP_DIR", path(dir)));
    }
    let cluster = &config.cluster;
    if let Some(members) = &cluster.initial_members {
        vars.push(("CLUSTER__INITIAL_MEMBERS", members.to_string()));
    }
    vars.extend([
        (
            "CLUSTER__REPLICATION_FACTOR",
            cluster.replication_factor.to_string(),
        ),
        (
            "CLUSTER__VNODES_PER_NODE",
            cluster.vnodes_per_node.to_string(),
        ),
        (
            "CLUSTER__FAILOVER_AFTER_MS",
            cluster.failover_after_ms.to_string(),
        ),
        ("CLUSTER__HEARTBEAT_MS", cluster.heartbeat_ms.to_string()),
        (
            "CLUSTER__MAX_CLOCK_OFFSET_MS",
            cluster.max_clock_offset_ms.to_string(),
        ),
        (
            "CLUSTER__ELECTION_TIMEOUT_MS",
            cluster.election_timeout_ms.to_string(),
        ),
    ]);
    vars.into_iter()
        .map(|(k, v)| (format!("{}{k}", caskade_node::config::ENV_PREFIX), v))
        .collect()
}
