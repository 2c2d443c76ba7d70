//! `caskade certs`: writes a new cluster CA and certificates signed by it.

use std::path::PathBuf;

use anyhow::Context;
use caskade_common::certs::write_cluster_certs;
use clap::Args;

/// Options of `caskade certs`.
#[derive(Debug, Args)]
pub struct CertsArgs {
    /// Directory to write the files to (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Number of node certificates (`node-1.pem` … `node-N.pem`).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    nodes: u32,
    /// Extra host names or IP addresses for every certificate, besides
    /// localhost, 127.0.0.1 and ::1 (comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    hosts: Vec<String>,
    /// Replace an existing CA (certificates signed by the old one stop working).
    #[arg(long)]
    force: bool,
}

/// Generates the files and lists them.
pub fn run(args: &CertsArgs) -> anyhow::Result<()> {
    let files = write_cluster_certs(&args.out, args.nodes, &args.hosts, args.force)
        .with_context(|| format!("writing certificates to {}", args.out.display()))?;
    println!("CA:      {}", files.ca.display());
    for (i, node) in files.nodes.iter().enumerate() {
        println!(
            "node {}:  {} {}",
            i + 1,
            node.cert.display(),
            node.key.display()
        );
    }
    println!(
        "router:  {} {}",
        files.router.cert.display(),
        files.router.key.display()
    );
    println!(
        "client:  {} {}",
        files.client.cert.display(),
        files.client.key.display()
    );
    println!("Keep ca-key.pem secret; nodes need only ca.pem and their own pair.");
    Ok(())
}
