//! The results of one benchmark run and the table that shows them: every
//! figure, the ratios the engine's targets are stated in, and a verdict per
//! target. Rendering only; nothing here measures or touches the disk.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use crate::caskade::{AlwaysRun, Live, Startup};
use crate::measure::Throughput;
use crate::workload::{KEY_LEN, VALUE_LEN};

/// One peer engine's results (filled only with the `peers` feature).
#[derive(Debug)]
pub struct PeerRun {
    /// Engine name and major version.
    pub name: &'static str,
    /// The durability setting and transaction shape used, in words.
    pub setting: &'static str,
    /// Single-thread puts.
    pub puts: Throughput,
    /// Random gets with 1 and with 2 threads.
    pub gets: [Throughput; 2],
}

/// Everything one run measured.
#[derive(Debug)]
pub struct Results {
    /// Keys in the workload.
    pub keys: usize,
    /// The workload seed.
    pub seed: u64,
    /// Where the data lived (deleted at exit).
    pub dir: PathBuf,
    /// Time bound of each `always` phase.
    pub phase_time: Duration,
    /// Naive baseline, one `write_all` per put.
    pub naive_per_put: Throughput,
    /// Naive baseline through a `BufWriter`.
    pub naive_buffered: Throughput,
    /// Naive baseline gets with 1 and 2 threads.
    pub naive_gets: [Throughput; 2],
    /// Heap bytes per key of the naive index.
    pub naive_bytes_per_key: f64,
    /// caskade `never` load and reads.
    pub live: Live,
    /// caskade start-up.
    pub startup: Startup,
    /// caskade `always` runs, by writer count.
    pub always: Vec<AlwaysRun>,
    /// Peer engines; `None` when built without the `peers` feature.
    pub peers: Option<Vec<PeerRun>>,
}

/// Target for caskade `never` puts as a fraction of the naive baseline.
const PUT_VS_NAIVE: f64 = 0.70;
/// Target for 64-writer over 1-writer `always` throughput.
const GROUP_COMMIT_GAIN: f64 = 20.0;
/// Target for scan-open time over hinted-open time.
const HINT_GAIN: f64 = 3.0;
/// Target keydir heap bytes per key: 64 plus the key.
const BYTES_PER_KEY: f64 = 64.0 + KEY_LEN as f64;
/// Targets for caskade over each peer: puts, gets.
const PEER_PUTS: f64 = 1.5;
const PEER_GETS: f64 = 1.0;

/// `1234567.8` → `1,234,568`.
fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn rate(t: &Throughput) -> String {
    format!("{} ops/s", thousands(t.per_sec()))
}

fn verdict(met: bool) -> &'static str {
    if met { "ok" } else { "MISSED" }
}

/// `target` as text with whether `met`.
fn target(text: &str, met: bool) -> String {
    format!("{text:<8} {}", verdict(met))
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

#[derive(Default)]
struct Table {
    out: String,
}

impl Table {
    fn section(&mut self, title: &str) {
        let _ = writeln!(self.out, "\n{title}");
    }

    fn row(&mut self, label: &str, value: String, detail: String, target: String) {
        let line = format!("  {label:<36} {value:>17}   {detail:<44} {target}");
        let _ = writeln!(self.out, "{}", line.trim_end());
    }
}

/// The results table, ready to print.
pub fn render(r: &Results) -> String {
    let mut t = Table::default();
    let _ = writeln!(
        t.out,
        "caskade-bench: {} keys of {KEY_LEN} B, values of {VALUE_LEN} B, seed {}, data under {}",
        thousands(r.keys as f64),
        r.seed,
        r.dir.display()
    );
    let _ = write!(
        t.out,
        "  {:<36} {:>17}   {:<44} target",
        "", "result", "detail"
    );

    let caskade_puts = r.live.puts.per_sec();
    t.section("PUTS, single thread, no fsync");
    t.row(
        "caskade put (durability never)",
        rate(&r.live.puts),
        String::new(),
        String::new(),
    );
    let share = caskade_puts / r.naive_per_put.per_sec();
    t.row(
        "naive log, write_all per put",
        rate(&r.naive_per_put),
        format!("caskade = {:.0} % (same crash guarantee)", share * 100.0),
        target(
            &format!(">= {:.0} %", PUT_VS_NAIVE * 100.0),
            share >= PUT_VS_NAIVE,
        ),
    );
    let share = caskade_puts / r.naive_buffered.per_sec();
    t.row(
        "naive log, BufWriter",
        rate(&r.naive_buffered),
        format!("caskade = {:.0} % (loses tail on crash)", share * 100.0),
        target(
            &format!(">= {:.0} %", PUT_VS_NAIVE * 100.0),
            share >= PUT_VS_NAIVE,
        ),
    );

    t.section(&format!(
        "PUTS, durability always (each phase stops at {} puts or {:.0} s)",
        thousands(r.keys as f64),
        r.phase_time.as_secs_f64()
    ));
    for run in &r.always {
        let per_fsync = run.puts.ops as f64 / run.fsyncs.max(1) as f64;
        t.row(
            &format!("caskade put, {} writer(s)", run.writers),
            rate(&run.puts),
            format!(
                "{} puts in {}, {} fsyncs, {per_fsync:.1} puts/fsync",
                thousands(run.puts.ops as f64),
                secs(run.puts.elapsed),
                thousands(run.fsyncs as f64)
            ),
            String::new(),
        );
    }
    let by_writers = |n: usize| r.always.iter().find(|run| run.writers == n);
    if let (Some(one), Some(many)) = (by_writers(1), by_writers(64)) {
        let gain = many.puts.per_sec() / one.puts.per_sec();
        t.row(
            "group commit gain, 64 / 1 writers",
            format!("{gain:.1}x"),
            String::new(),
            target(
                &format!(">= {GROUP_COMMIT_GAIN:.0}x"),
                gain >= GROUP_COMMIT_GAIN,
            ),
        );
    }

    t.section("GETS, random order, every key present (values checked)");
    for (threads, (caskade, naive)) in [1, 2].iter().zip(r.live.gets.iter().zip(&r.naive_gets)) {
        t.row(
            &format!("caskade get, {threads} thread(s)"),
            rate(caskade),
            String::new(),
            String::new(),
        );
        t.row(
            &format!("naive log get, {threads} thread(s)"),
            rate(naive),
            format!(
                "caskade = {:.0} %",
                caskade.per_sec() / naive.per_sec() * 100.0
            ),
            String::new(),
        );
    }

    let s = &r.startup;
    t.section("START-UP AND MEMORY (page cache warm, best of 3 opens)");
    let gain = s.scanned.as_secs_f64() / s.hinted.as_secs_f64().max(1e-9);
    t.row(
        "open with hint files",
        secs(s.hinted),
        format!("{} data files, {} hint files", s.data_files, s.hint_files),
        String::new(),
    );
    t.row(
        "open by scan (*.hint deleted)",
        secs(s.scanned),
        format!("scan / hints = {gain:.1}x"),
        target(&format!(">= {HINT_GAIN:.0}x"), gain >= HINT_GAIN),
    );
    let limit = format!("<= {BYTES_PER_KEY:.0} B");
    t.row(
        "heap per key after hinted open",
        format!("{:.1} B", s.hinted_bytes_per_key),
        "bytes allocated by Engine::open / keys".into(),
        target(&limit, s.hinted_bytes_per_key <= BYTES_PER_KEY),
    );
    t.row(
        "heap per key after scanning open",
        format!("{:.1} B", s.scanned_bytes_per_key),
        String::new(),
        target(&limit, s.scanned_bytes_per_key <= BYTES_PER_KEY),
    );
    t.row(
        "heap per key after the live load",
        format!("{:.1} B", r.live.bytes_per_key),
        "keydir built by random inserts".into(),
        target(&limit, r.live.bytes_per_key <= BYTES_PER_KEY),
    );
    t.row(
        "naive HashMap index, per key",
        format!("{:.1} B", r.naive_bytes_per_key),
        "for scale".into(),
        String::new(),
    );

    match &r.peers {
        None => {
            t.section("PEERS: skipped (build with --features peers to compare with fjall and redb)")
        }
        Some(peers) => {
            t.section("PEERS, same puts and gets (caskade / peer: higher is better for caskade)");
            for p in peers {
                let puts = caskade_puts / p.puts.per_sec();
                t.row(
                    &format!("{} put", p.name),
                    rate(&p.puts),
                    format!("caskade / {} = {puts:.2}x", p.name),
                    target(&format!(">= {PEER_PUTS:.1}x"), puts >= PEER_PUTS),
                );
                for (threads, (peer, caskade)) in [1, 2].iter().zip(p.gets.iter().zip(&r.live.gets))
                {
                    let gets = caskade.per_sec() / peer.per_sec();
                    t.row(
                        &format!("{} get, {threads} thread(s)", p.name),
                        rate(peer),
                        format!("caskade / {} = {gets:.2}x", p.name),
                        target(&format!(">= {PEER_GETS:.1}x"), gets >= PEER_GETS),
                    );
                }
            }
            for p in peers {
                let _ = writeln!(t.out, "  {} setting: {}", p.name, p.setting);
            }
        }
    }
    t.out
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn groups_digits() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.8), "1,234,568");
    }
}
