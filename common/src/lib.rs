//! caskade-common: the types and rules the router and the storage nodes must
//! agree on. Nothing here does I/O; everything here is cheap to call on a
//! request path.

pub mod limits;
pub mod version;

pub use limits::{LimitError, validate_key, validate_value};
pub use version::{Hlc, Version};
