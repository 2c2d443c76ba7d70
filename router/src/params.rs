//! Reading keys and query parameters out of request URIs, strictly.
//!
//! Keys are bytes, percent-encoded in the path and may contain `/`. The
//! decoding here is strict where common decoders are lenient: a `%` not
//! followed by two hex digits is an error, and `+` is a plus, not a space.
//! Unknown query parameters are refused, so a typo (`?tll=60`) is a 400
//! instead of a setting silently ignored.

use caskade_common::limits::MAX_KEY_BYTES;

use crate::error::ApiError;

/// Decodes `%XX` escapes; anything else must be a literal byte.
pub fn percent_decode(input: &str, what: &str) -> Result<Vec<u8>, ApiError> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    ApiError::bad_request(
                        if what == "key" {
                            "invalid_key"
                        } else {
                            "invalid_query"
                        },
                        format!("{what}: bad percent-encoding at byte {i}"),
                    )
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// The key of a `/v1/kv/{key}` path: decoded and within the key limits.
pub fn key_from_path(raw_path: &str, route_prefix: &str) -> Result<Vec<u8>, ApiError> {
    let encoded = raw_path.strip_prefix(route_prefix).unwrap_or_default();
    let key = percent_decode(encoded, "key")?;
    validate_key(&key)?;
    Ok(key)
}

/// Keys are 1..=1024 bytes; longer is 413, empty is 400.
pub fn validate_key(key: &[u8]) -> Result<(), ApiError> {
    match caskade_common::validate_key(key) {
        Ok(()) => Ok(()),
        Err(caskade_common::LimitError::KeyTooLong { len, max }) => Err(ApiError::TooLarge(
            format!("key is {len} bytes, more than the maximum of {max}"),
        )),
        Err(e) => Err(ApiError::bad_request("invalid_key", e.to_string())),
    }
}

/// A listing cursor may be any bytes up to the key length limit.
pub fn check_cursor(after: &[u8]) -> Result<(), ApiError> {
    if after.len() > MAX_KEY_BYTES {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("after is longer than the maximum key length of {MAX_KEY_BYTES}"),
        ));
    }
    Ok(())
}

/// A query string's parameters, each allowed name at most once.
#[derive(Debug, Default)]
pub struct Query {
    pairs: Vec<(String, Vec<u8>)>,
}

impl Query {
    /// Parses `query`, refusing names not in `allowed`, repeats and bad encoding.
    pub fn parse(query: Option<&str>, allowed: &[&str]) -> Result<Query, ApiError> {
        let mut pairs: Vec<(String, Vec<u8>)> = Vec::new();
        for part in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (name, value) = part.split_once('=').unwrap_or((part, ""));
            let name = String::from_utf8(percent_decode(name, "query")?).map_err(|_| {
                ApiError::bad_request("invalid_query", "parameter names must be UTF-8")
            })?;
            if !allowed.contains(&name.as_str()) {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!(
                        "unknown query parameter {name:?}; allowed: {}",
                        allowed.join(", ")
                    ),
                ));
            }
            if pairs.iter().any(|(n, _)| *n == name) {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("{name} given twice"),
                ));
            }
            pairs.push((name, percent_decode(value, "query")?));
        }
        Ok(Query { pairs })
    }

    /// The raw bytes of `name`, if given.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        self.pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// `name` as a UTF-8 string, if given.
    pub fn text(&self, name: &str) -> Result<Option<&str>, ApiError> {
        self.bytes(name)
            .map(|v| {
                std::str::from_utf8(v).map_err(|_| {
                    ApiError::bad_request("invalid_query", format!("{name} must be UTF-8"))
                })
            })
            .transpose()
    }

    /// `name` as an integer in `range`, if given.
    pub fn number(
        &self,
        name: &str,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<Option<u64>, ApiError> {
        let Some(text) = self.text(name)? else {
            return Ok(None);
        };
        match text.parse::<u64>() {
            Ok(n) if range.contains(&n) => Ok(Some(n)),
            _ => Err(ApiError::bad_request(
                "invalid_query",
                format!(
                    "{name} must be an integer from {} to {}",
                    range.start(),
                    range.end()
                ),
            )),
        }
    }

    /// A prefix or cursor key: any bytes up to the key length limit.
    pub fn key_bytes(&self, name: &str) -> Result<Vec<u8>, ApiError> {
        let value = self.bytes(name).unwrap_or_default();
        if value.len() > MAX_KEY_BYTES {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("{name} is longer than the maximum key length of {MAX_KEY_BYTES}"),
            ));
        }
        Ok(value.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_decode_strictly() {
        assert_eq!(
            key_from_path("/v1/kv/a%2Fb/c+d", "/v1/kv/").unwrap(),
            b"a/b/c+d"
        );
        assert_eq!(
            key_from_path("/v1/kv/%ff%00", "/v1/kv/").unwrap(),
            [0xff, 0]
        );
        for bad in ["/v1/kv/a%zz", "/v1/kv/a%2", "/v1/kv/%", "/v1/kv/%+a"] {
            let err = key_from_path(bad, "/v1/kv/").unwrap_err();
            assert_eq!(err.code(), "invalid_key", "{bad}");
        }
        assert_eq!(
            key_from_path("/v1/kv/", "/v1/kv/").unwrap_err().code(),
            "invalid_key"
        );
        let long = format!("/v1/kv/{}", "k".repeat(1025));
        assert_eq!(
            key_from_path(&long, "/v1/kv/").unwrap_err().code(),
            "too_large"
        );
    }

    #[test]
    fn queries_refuse_unknown_repeated_and_out_of_range() {
        let q = Query::parse(Some("ttl=60&w=all"), &["ttl", "w"]).unwrap();
        assert_eq!(q.number("ttl", 1..=100).unwrap(), Some(60));
        assert_eq!(q.text("w").unwrap(), Some("all"));
        assert!(Query::parse(Some("tll=60"), &["ttl"]).is_err());
        assert!(Query::parse(Some("ttl=1&ttl=2"), &["ttl"]).is_err());
        assert!(Query::parse(Some("ttl=%G0"), &["ttl"]).is_err());
        let q = Query::parse(Some("ttl=0"), &["ttl"]).unwrap();
        assert!(q.number("ttl", 1..=100).is_err());
        let q = Query::parse(Some("ttl=abc"), &["ttl"]).unwrap();
        assert!(q.number("ttl", 1..=100).is_err());
    }
}
