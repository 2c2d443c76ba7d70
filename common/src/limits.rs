//! Size limits on keys and values, and their validation.
//!
//! One definition, used by the engine, the node's gRPC service and the router,
//! so that a request the router accepts is never refused further down (and
//! the other way round). Validation never allocates and never panics.

use thiserror::Error;

/// Longest key accepted anywhere in caskade, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;

/// Default largest value, in bytes (1 MiB); configurable per deployment.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 1 << 20;

/// Hard ceiling for a configured `max_value_bytes` (256 MiB): record lengths
/// are stored as `u32` and a record must fit in one data file.
pub const MAX_VALUE_BYTES_CEILING: usize = 256 << 20;

/// A key or value outside the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum LimitError {
    /// Keys are 1..=1024 bytes; the empty key is refused.
    #[error("key is empty")]
    EmptyKey,
    /// The key is longer than [`MAX_KEY_BYTES`].
    #[error("key is {len} bytes, more than the maximum of {max}")]
    KeyTooLong {
        /// Length of the refused key.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The value is larger than the configured maximum.
    #[error("value is {len} bytes, more than the maximum of {max}")]
    ValueTooLarge {
        /// Length of the refused value.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Checks that `key` is 1..=[`MAX_KEY_BYTES`] bytes long.
pub fn validate_key(key: &[u8]) -> Result<(), LimitError> {
    match key.len() {
        0 => Err(LimitError::EmptyKey),
        len if len > MAX_KEY_BYTES => Err(LimitError::KeyTooLong {
            len,
            max: MAX_KEY_BYTES,
        }),
        _ => Ok(()),
    }
}

/// Checks that `value` is at most `max` bytes long.
pub fn validate_value(value: &[u8], max: usize) -> Result<(), LimitError> {
    if value.len() > max {
        return Err(LimitError::ValueTooLarge {
            len: value.len(),
            max,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_bounds() {
        assert_eq!(validate_key(b""), Err(LimitError::EmptyKey));
        assert_eq!(validate_key(b"a"), Ok(()));
        assert_eq!(validate_key(&[7; MAX_KEY_BYTES]), Ok(()));
        assert_eq!(
            validate_key(&[7; MAX_KEY_BYTES + 1]),
            Err(LimitError::KeyTooLong {
                len: MAX_KEY_BYTES + 1,
                max: MAX_KEY_BYTES
            })
        );
    }

    #[test]
    fn value_bounds() {
        assert_eq!(validate_value(b"", 0), Ok(()));
        assert_eq!(validate_value(&[0; 10], 10), Ok(()));
        assert_eq!(
            validate_value(&[0; 11], 10),
            Err(LimitError::ValueTooLarge { len: 11, max: 10 })
        );
    }
}
