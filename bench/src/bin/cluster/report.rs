//! The run's results as the Markdown table the other benchmarks print: one
//! row per figure (phase, figure, value) under a line saying what ran, and
//! how durations and shares are written. Rendering only.

use std::time::Duration;

/// The rows of the table, in the order they were measured.
#[derive(Debug, Default)]
pub struct Report {
    rows: Vec<(String, String, String)>,
}

impl Report {
    /// Adds a row.
    pub fn add(&mut self, phase: &str, figure: impl Into<String>, value: impl Into<String>) {
        self.rows
            .push((phase.to_owned(), figure.into(), value.into()));
    }

    /// Prints `setup` (what ran) and the table to stdout; nothing if no
    /// figure was measured.
    pub fn print(&self, setup: &str) {
        if self.rows.is_empty() {
            return;
        }
        println!("{setup}");
        println!();
        println!("| phase | figure | value |");
        println!("|---|---|---|");
        for (phase, figure, value) in &self.rows {
            println!("| {phase} | {figure} | {value} |");
        }
    }
}

/// A share of one core, in percent.
pub fn percent(share: f64) -> String {
    format!("{share:.2} % of one core")
}

/// A duration in seconds.
pub fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// A latency in milliseconds.
pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// The mean of `spans` in seconds, or `none`.
pub fn mean(spans: &[Duration]) -> String {
    if spans.is_empty() {
        return "none".to_owned();
    }
    let total: Duration = spans.iter().sum();
    secs(total / spans.len() as u32)
}
