//! `caskade`: the command-line tool for caskade clusters.
//!
//! Subcommands: `certs` (a cluster CA and certificates for nodes, router and
//! clients). Each subcommand lives in its own module; this file only parses.

mod certs;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// caskade: a distributed key-value store.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a cluster CA and certificates for nodes, the router and a client.
    Certs(certs::CertsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Certs(args) => certs::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("caskade: {e:#}");
            ExitCode::FAILURE
        }
    }
}
