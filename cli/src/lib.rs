//! caskade-cli: the `caskade` command's subcommands, as a library so that
//! tests can start a local cluster the way `caskade local` does.

pub mod admin;
pub mod certs;
pub mod client;
pub mod health;
pub mod local;
pub mod token;
