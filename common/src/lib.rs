//! caskade-common: what the router and the storage nodes share: configuration
//! loading, TLS material, telemetry (logs, request ids, metrics), versions,
//! the consistent-hash ring, and the key/value limits both sides must agree on.
//!
//! [`limits`], [`ring`] and [`version`] do no I/O and are cheap on request paths;
//! [`config`], [`tls`] and [`telemetry`] are start-up and plumbing code.

#[cfg(feature = "certs")]
pub mod certs;
pub mod config;
pub mod limits;
pub mod process;
pub mod ring;
pub mod telemetry;
pub mod tls;
pub mod version;

pub use limits::{LimitError, validate_key, validate_value};
pub use ring::Ring;
pub use version::{Hlc, Version};
