//! A network of hosts for fault tests: one Linux network namespace per
//! host, each joined to a bridge in a hub namespace by a veth pair, so that
//! the link between any two hosts can be cut, made lossy or taken down
//! while both keep running. Every address is private to these namespaces
//! (`10.77.0.0/24` inside them, which nothing outside can route to): no
//! traffic leaves them.
//!
//! - A *cut* drops, silently, every packet between two hosts (iptables in
//!   each host's namespace): connections stall as behind a failed switch,
//!   rather than being refused.
//! - A *flap* takes a host's link down and up again.
//! - A *slow link* holds every packet a host sends or receives on its link
//!   for a time drawn around a mean, and drops a share of them, as
//!   `tc netem delay … loss …` would (the kernel this runs on may lack
//!   `sch_netem`: it does where caskade is tested). The packets go to an
//!   NFQUEUE in the host's namespace, and a thread of the test releases
//!   each once its time has come, in the order they came (so the jitter
//!   never reorders a stream), or drops it; every draw comes from the
//!   test's seed.
//!
//! Namespaces need root. Where it is missing the test is skipped with the
//! reason printed, except in CI (`CI` set), where it fails, as for
//! [`crate::disk::SmallDisk`]. Everything made is removed when the
//! [`Network`] drops, also when a test panics, processes still running in
//! its namespaces killed; namespaces a killed test process left behind
//! (and their processes) are removed by the next one.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

/// Where `ip netns` keeps its namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Prefix of every namespace made here: `ckf<pid>x<n>-…`.
const PREFIX: &str = "ckf";
/// The hosts' subnet; host `i` is `10.77.0.(i + 1)`.
const SUBNET: [u8; 3] = [10, 77, 0];

/// Networks made by this process, for unique names.
static NEXT_NETWORK: AtomicU32 = AtomicU32::new(1);

/// One host: a network namespace with one link to the hub.
#[derive(Debug, Clone)]
pub struct Host {
    /// The namespace's name (for `ip netns exec`).
    pub netns: String,
    /// The host's address on the hub's bridge.
    pub ip: Ipv4Addr,
    /// Its link's end in the hub namespace.
    hub_end: String,
}

/// Hosts on one bridge; removed on drop.
#[derive(Debug)]
pub struct Network {
    hub: String,
    hosts: Vec<Host>,
    tools: Tools,
    /// Rules in force, to heal them all at once.
    rules: Mutex<Vec<(usize, Vec<String>)>>,
    /// Delaying threads at work: their stop flags and handles.
    delays: Mutex<Vec<(Arc<AtomicBool>, JoinHandle<()>)>>,
}

/// The absolute paths of the programs used (a node's environment is
/// cleared, so nothing may rely on `PATH` later).
#[derive(Debug, Clone)]
struct Tools {
    ip: PathBuf,
    iptables: PathBuf,
}

impl Network {
    /// `hosts` hosts on one bridge, or `None` with the reason printed where
    /// namespaces cannot be made (outside CI only).
    pub fn new(hosts: usize) -> Option<Network> {
        let refuse = |why: String| {
            if std::env::var_os("CI").is_some() {
                panic!("a network fault test cannot run in CI: {why}");
            }
            eprintln!("skipped: {why}");
            None
        };
        if !rustix::process::geteuid().is_root() {
            return refuse("network namespaces need root".into());
        }
        let tools = match (find_tool("ip"), find_tool("iptables")) {
            (Some(ip), Some(iptables)) => Tools { ip, iptables },
            _ => return refuse("`ip` (iproute2) and `iptables` are needed".into()),
        };
        remove_orphans(&tools);
        let name = format!(
            "{PREFIX}{}x{}",
            std::process::id(),
            NEXT_NETWORK.fetch_add(1, Ordering::Relaxed)
        );
        let hosts = (0..hosts)
            .map(|i| Host {
                netns: format!("{name}-h{i}"),
                ip: Ipv4Addr::new(
                    SUBNET[0],
                    SUBNET[1],
                    SUBNET[2],
                    u8::try_from(i + 1).unwrap_or(250),
                ),
                hub_end: format!("v{i}"),
            })
            .collect();
        let network = Network {
            hub: format!("{name}-hub"),
            hosts,
            tools,
            rules: Mutex::new(Vec::new()),
            delays: Mutex::new(Vec::new()),
        };
        match network.build() {
            Ok(()) => Some(network),
            // Dropping it removes what was made.
            Err(error) => refuse(format!("cannot make network namespaces: {error:#}")),
        }
    }

    fn build(&self) -> anyhow::Result<()> {
        let hub = self.hub.as_str();
        self.ip(&["netns", "add", hub])?;
        self.ip(&["-n", hub, "link", "add", "br0", "type", "bridge"])?;
        self.ip(&["-n", hub, "link", "set", "br0", "up"])?;
        for host in &self.hosts {
            let ns = host.netns.as_str();
            self.ip(&["netns", "add", ns])?;
            self.ip(&[
                "-n",
                hub,
                "link",
                "add",
                &host.hub_end,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            ])?;
            self.ip(&[
                "-n",
                hub,
                "link",
                "set",
                &host.hub_end,
                "master",
                "br0",
                "up",
            ])?;
            self.ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", host.ip),
                "dev",
                "eth0",
            ])?;
            self.ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            self.ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// Host `i`.
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// How many hosts there are.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Whether there are no hosts.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Moves the calling thread into host `i`'s namespace: its sockets,
    /// and those of the threads and processes it starts from now on, live
    /// on that host.
    pub fn enter(&self, i: usize) -> anyhow::Result<()> {
        let path = Path::new(NETNS_DIR).join(&self.hosts[i].netns);
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&file),
            Some(LinkNameSpaceType::Network),
        )
        .with_context(|| format!("entering {}", path.display()))?;
        Ok(())
    }

    /// A multi-threaded runtime whose threads live on host `i`. Moves the
    /// calling thread there too.
    pub fn runtime_on(&self, i: usize) -> anyhow::Result<tokio::runtime::Runtime> {
        self.enter(i)?;
        Ok(tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?)
    }

    /// The command prefix that runs a program on host `i`.
    pub fn launcher(&self, i: usize) -> Vec<OsString> {
        vec![
            self.tools.ip.clone().into(),
            "netns".into(),
            "exec".into(),
            self.hosts[i].netns.clone().into(),
        ]
    }

    /// Drops every packet between hosts `a` and `b`, both ways.
    pub fn cut(&self, a: usize, b: usize) -> anyhow::Result<()> {
        self.add_rule(
            a,
            &["INPUT", "-s", &self.hosts[b].ip.to_string(), "-j", "DROP"],
        )?;
        self.add_rule(
            b,
            &["INPUT", "-s", &self.hosts[a].ip.to_string(), "-j", "DROP"],
        )
    }

    /// Cuts host `a` from every other host.
    pub fn isolate(&self, a: usize) -> anyhow::Result<()> {
        for b in (0..self.hosts.len()).filter(|&b| b != a) {
            self.cut(a, b)?;
        }
        Ok(())
    }

    /// Holds every packet host `a` sends or receives on its link for
    /// `mean` ± `jitter`, and drops `loss_percent` of them (every draw
    /// uniform, from `seed`), until [`Network::heal`].
    pub fn slow(
        &self,
        a: usize,
        mean: Duration,
        jitter: Duration,
        loss_percent: u64,
        seed: u64,
    ) -> anyhow::Result<()> {
        let queue_number = 100 + u16::try_from(a)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (bound, bound_rx) = std::sync::mpsc::channel();
        let path = Path::new(NETNS_DIR).join(&self.hosts[a].netns);
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let queue = File::open(&path)
                    .map_err(anyhow::Error::from)
                    .and_then(|file| {
                        move_into_link_name_space(
                            std::os::fd::AsFd::as_fd(&file),
                            Some(LinkNameSpaceType::Network),
                        )?;
                        let mut queue = nfq::Queue::open()?;
                        queue.bind(queue_number)?;
                        // Headers only: the payload is not looked at.
                        queue.set_copy_range(queue_number, 0)?;
                        queue.set_queue_max_len(queue_number, 65536)?;
                        // A full queue lets packets through rather than
                        // dropping them: loss is made on purpose only.
                        queue.set_fail_open(queue_number, true)?;
                        queue.set_nonblocking(true);
                        Ok(queue)
                    });
                match queue {
                    Ok(queue) => {
                        let _ = bound.send(Ok(()));
                        hold_packets(queue, &stop, mean, jitter, loss_percent, seed);
                    }
                    Err(error) => {
                        let _ = bound.send(Err(error));
                    }
                }
            })
        };
        bound_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("the delaying thread ended before binding its queue"))??;
        self.delays
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((stop, thread));
        let queue = queue_number.to_string();
        for (chain, direction) in [("INPUT", "-i"), ("OUTPUT", "-o")] {
            self.add_rule(
                a,
                &[
                    chain,
                    direction,
                    "eth0",
                    "-j",
                    "NFQUEUE",
                    "--queue-num",
                    &queue,
                    "--queue-bypass",
                ],
            )?;
        }
        Ok(())
    }

    /// Takes host `a`'s link down (`up == false`) or up again.
    pub fn set_link(&self, a: usize, up: bool) -> anyhow::Result<()> {
        let state = if up { "up" } else { "down" };
        self.ip(&[
            "-n",
            &self.hub,
            "link",
            "set",
            &self.hosts[a].hub_end,
            state,
        ])
    }

    /// Removes every cut, loss and delay, and brings every link up.
    pub fn heal(&self) -> anyhow::Result<()> {
        let rules = std::mem::take(&mut *self.rules.lock().unwrap_or_else(|p| p.into_inner()));
        for (host, rule) in rules.iter().rev() {
            let mut args: Vec<&str> = vec!["-w", "-D"];
            args.extend(rule.iter().map(String::as_str));
            self.iptables(*host, &args)?;
        }
        for a in 0..self.hosts.len() {
            self.set_link(a, true)?;
        }
        // With the rules gone no packet enters a queue; those held are
        // released before the threads end.
        self.stop_delays();
        Ok(())
    }

    fn stop_delays(&self) {
        let delays = std::mem::take(&mut *self.delays.lock().unwrap_or_else(|p| p.into_inner()));
        for (stop, thread) in delays {
            stop.store(true, Ordering::Release);
            let _ = thread.join();
        }
    }

    fn add_rule(&self, host: usize, rule: &[&str]) -> anyhow::Result<()> {
        let mut args: Vec<&str> = vec!["-w", "-I"];
        args.extend_from_slice(rule);
        self.iptables(host, &args)?;
        self.rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((host, rule.iter().map(|s| (*s).to_string()).collect()));
        Ok(())
    }

    fn iptables(&self, host: usize, args: &[&str]) -> anyhow::Result<()> {
        let ns = self.hosts[host].netns.as_str();
        let mut all: Vec<&str> = vec!["netns", "exec", ns];
        let iptables = self.tools.iptables.to_string_lossy().into_owned();
        all.push(&iptables);
        all.extend_from_slice(args);
        self.ip(&all)
    }

    fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        run(&self.tools.ip, args)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.stop_delays();
        for ns in self.hosts.iter().map(|h| &h.netns).chain([&self.hub]) {
            remove_namespace(&self.tools, ns);
        }
    }
}

/// Kills what still runs in namespace `ns` (a namespace outlives its name
/// while a process runs in it), then deletes it and with it its links.
fn remove_namespace(tools: &Tools, ns: &str) {
    if let Ok(output) = Command::new(&tools.ip)
        .args(["netns", "pids", ns])
        .stdin(Stdio::null())
        .output()
    {
        for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
            if let Some(pid) = pid.parse().ok().and_then(rustix::process::Pid::from_raw) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
    let _ = run(&tools.ip, &["netns", "delete", ns]);
}

/// Releases each packet of `queue` once `mean` ± `jitter` has passed since
/// it came, never before one that came earlier, or drops it
/// (`loss_percent` of them), until `stop` is set; then releases every
/// packet held or still queued.
fn hold_packets(
    mut queue: nfq::Queue,
    stop: &AtomicBool,
    mean: Duration,
    jitter: Duration,
    loss_percent: u64,
    seed: u64,
) {
    let mut rng = crate::rng::Rng(seed);
    let mut held: VecDeque<(Instant, nfq::Message)> = VecDeque::new();
    let mut last = Instant::now();
    let spread = u64::try_from(jitter.as_micros()).unwrap_or(0);
    loop {
        let stopping = stop.load(Ordering::Acquire);
        let now = Instant::now();
        while held.front().is_some_and(|(due, _)| stopping || *due <= now) {
            if let Some((_, mut message)) = held.pop_front() {
                message.set_verdict(nfq::Verdict::Accept);
                let _ = queue.verdict(message);
            }
        }
        loop {
            match queue.recv() {
                Ok(mut message) if stopping => {
                    message.set_verdict(nfq::Verdict::Accept);
                    let _ = queue.verdict(message);
                }
                Ok(mut message) if rng.percent(loss_percent) => {
                    message.set_verdict(nfq::Verdict::Drop);
                    let _ = queue.verdict(message);
                }
                Ok(message) => {
                    let drawn = (mean + Duration::from_micros(rng.below(2 * spread + 1)))
                        .saturating_sub(jitter);
                    last = last.max(Instant::now() + drawn);
                    held.push_back((last, message));
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => break,
            }
        }
        if stopping {
            return;
        }
        let next = held.front().map_or(Duration::from_millis(1), |(due, _)| {
            due.saturating_duration_since(Instant::now())
        });
        std::thread::sleep(next.min(Duration::from_millis(1)));
    }
}

/// Removes the namespaces of test processes that no longer run.
fn remove_orphans(tools: &Tools) {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('x').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
            remove_namespace(tools, &name);
        }
    }
}

/// `program args…`, failing with what it printed.
fn run(program: &Path, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", program.display()))?;
    if !output.status.success() {
        bail!(
            "{} {}: {}",
            program.display(),
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// `name`'s absolute path, from `PATH` and the system directories.
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
