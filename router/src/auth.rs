//! JWT bearer authentication and role/prefix authorization for the router.
//!
//! This module owns the `[auth]` configuration, the verification keys loaded from it,
//! turning an `Authorization` header into a [`Principal`], deciding whether that
//! principal may touch a key or list a prefix, and issuing HS256 tokens for
//! `caskade token` and `caskade local`. It must never choose the verification
//! algorithm from the token: every key is bound to exactly one algorithm at load time,
//! and a token is checked only with the algorithm of the key it selects. It must never
//! let a client tell the failure reasons apart: every [`AuthError`] is a 401 and every
//! [`Forbidden`] a 403 with a fixed message; [`AuthError::reason`] is for metrics and
//! logs only. It records no metrics itself (the HTTP layer counts failures by reason).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use http::HeaderValue;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Shortest HS256 secret accepted, in bytes (RFC 7518 §3.2: at least the hash size).
pub const MIN_HS256_SECRET_BYTES: usize = 32;

/// Default clock skew allowed on `exp` and `nbf`, in seconds.
pub const DEFAULT_LEEWAY_SECS: u64 = 30;

/// Largest accepted `leeway_secs`. jsonwebtoken computes `now - leeway` and
/// `now + leeway` in `u64`, so an absurd leeway would overflow; an hour of skew
/// already means a broken clock.
pub const MAX_LEEWAY_SECS: u64 = 3600;

/// Tokens longer than this are refused before any base64 or JSON work. Ours are a few
/// hundred bytes; the cap keeps a hostile header from costing more than a lookup.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// `Path` reported in errors for a secret given as bytes rather than a file.
const IN_MEMORY_SECRET: &str = "(in-memory secret)";

/// The router config's `[auth]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 secrets, each a file holding the secret (raw bytes, trailing newline trimmed), with an optional `kid`.
    #[serde(default)]
    pub hs256: Vec<SecretKeyFile>,
    /// Public keys (PEM) for asymmetric algorithms, each with an optional `kid` and its algorithm: "EdDSA", "ES256" or "RS256".
    #[serde(default)]
    pub public_keys: Vec<PublicKeyFile>,
    /// Required `iss` claim, when set.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Required `aud` claim (the token's `aud` must be or contain it), when set.
    #[serde(default)]
    pub audience: Option<String>,
    /// Clock skew allowed on `exp`/`nbf`, seconds (default 30, at most 3600).
    #[serde(default = "default_leeway_secs")]
    pub leeway_secs: u64,
}

fn default_leeway_secs() -> u64 {
    DEFAULT_LEEWAY_SECS
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            hs256: Vec::new(),
            public_keys: Vec::new(),
            issuer: None,
            audience: None,
            leeway_secs: DEFAULT_LEEWAY_SECS,
        }
    }
}

/// An HS256 secret stored in a file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretKeyFile {
    /// Key id matched against the token header's `kid`; `None` for tokens without one.
    #[serde(default)]
    pub kid: Option<String>,
    /// File holding the secret bytes.
    pub path: PathBuf,
}

/// A PEM public key stored in a file, bound to one asymmetric algorithm.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKeyFile {
    /// Key id matched against the token header's `kid`; `None` for tokens without one.
    #[serde(default)]
    pub kid: Option<String>,
    /// The only algorithm this key verifies.
    pub algorithm: AsymmetricAlgorithm,
    /// File holding the PEM public key (`-----BEGIN PUBLIC KEY-----`).
    pub path: PathBuf,
}

/// Asymmetric signature algorithms accepted for [`PublicKeyFile`]s, named as in the JWT `alg` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AsymmetricAlgorithm {
    /// Ed25519 signatures.
    #[serde(rename = "EdDSA")]
    EdDsa,
    /// ECDSA over P-256 with SHA-256.
    #[serde(rename = "ES256")]
    Es256,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    #[serde(rename = "RS256")]
    Rs256,
}

impl AsymmetricAlgorithm {
    fn algorithm(self) -> Algorithm {
        match self {
            Self::EdDsa => Algorithm::EdDSA,
            Self::Es256 => Algorithm::ES256,
            Self::Rs256 => Algorithm::RS256,
        }
    }

    fn decoding_key(self, pem: &[u8]) -> jsonwebtoken::errors::Result<DecodingKey> {
        match self {
            Self::EdDsa => DecodingKey::from_ed_pem(pem),
            Self::Es256 => DecodingKey::from_ec_pem(pem),
            Self::Rs256 => DecodingKey::from_rsa_pem(pem),
        }
    }
}

impl fmt::Display for AsymmetricAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::EdDsa => "EdDSA",
            Self::Es256 => "ES256",
            Self::Rs256 => "RS256",
        })
    }
}

/// Why the `[auth]` section cannot be turned into an [`Authenticator`] (a startup error).
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// Neither `hs256` nor `public_keys` names a key.
    #[error(
        "no verification keys configured: add an [[auth.hs256]] secret or an [[auth.public_keys]] key"
    )]
    NoKeys,
    /// A key file could not be read.
    #[error("cannot read key file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An HS256 secret is empty or shorter than [`MIN_HS256_SECRET_BYTES`].
    #[error("HS256 secret {path} has {len} bytes; at least {MIN_HS256_SECRET_BYTES} are required")]
    SecretTooShort {
        /// The file (or `(in-memory secret)`).
        path: PathBuf,
        /// Its length after trimming the trailing newline.
        len: usize,
    },
    /// A public-key entry points at a private key, which the router must not hold.
    #[error("{path} holds a private key; configure the {algorithm} public key instead")]
    PrivateKey {
        /// The file.
        path: PathBuf,
        /// The configured algorithm.
        algorithm: AsymmetricAlgorithm,
    },
    /// A public-key file is not a usable PEM public key for its algorithm.
    #[error("{path} is not a valid {algorithm} public key in PEM form")]
    BadPublicKey {
        /// The file.
        path: PathBuf,
        /// The configured algorithm.
        algorithm: AsymmetricAlgorithm,
    },
    /// Two keys share a `kid`, so a token naming it would be ambiguous.
    #[error("key id {kid:?} is configured for more than one key")]
    DuplicateKid {
        /// The repeated key id.
        kid: String,
    },
    /// `leeway_secs` is above [`MAX_LEEWAY_SECS`].
    #[error("auth leeway_secs {0} is above the maximum of {MAX_LEEWAY_SECS}")]
    LeewayTooLarge(u64),
}

/// Reads an HS256 secret file: raw bytes with one trailing `\n` or `\r\n` removed, at
/// least [`MIN_HS256_SECRET_BYTES`] long. `caskade token` uses it too, so the router
/// and the issuer always agree on the secret's bytes.
pub fn load_hs256_secret(path: &Path) -> Result<Vec<u8>, AuthConfigError> {
    let mut secret = std::fs::read(path).map_err(|source| AuthConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    if secret.last() == Some(&b'\n') {
        secret.pop();
        if secret.last() == Some(&b'\r') {
            secret.pop();
        }
    }
    check_secret_length(path, &secret)?;
    Ok(secret)
}

fn check_secret_length(path: &Path, secret: &[u8]) -> Result<(), AuthConfigError> {
    if secret.len() < MIN_HS256_SECRET_BYTES {
        return Err(AuthConfigError::SecretTooShort {
            path: path.to_owned(),
            len: secret.len(),
        });
    }
    Ok(())
}

fn load_public_key(file: &PublicKeyFile) -> Result<DecodingKey, AuthConfigError> {
    let pem = std::fs::read(&file.path).map_err(|source| AuthConfigError::Read {
        path: file.path.clone(),
        source,
    })?;
    let bad = || AuthConfigError::BadPublicKey {
        path: file.path.clone(),
        algorithm: file.algorithm,
    };
    // jsonwebtoken's RSA loader accepts a private key where a public one belongs and
    // only fails at verification time, so refuse private keys by their PEM label.
    if pem
        .windows(b"PRIVATE KEY-----".len())
        .any(|w| w == b"PRIVATE KEY-----")
    {
        return Err(AuthConfigError::PrivateKey {
            path: file.path.clone(),
            algorithm: file.algorithm,
        });
    }
    let key = file.algorithm.decoding_key(&pem).map_err(|_| bad())?;
    // The Ed25519 verifier slices the first 32 bytes of the key without a length
    // check; a shorter key would panic on every request instead of failing here.
    if file.algorithm == AsymmetricAlgorithm::EdDsa
        && key.try_get_as_bytes().map(<[u8]>::len).ok() != Some(32)
    {
        return Err(bad());
    }
    // Building a verifier parses the key (curve point, key length): do it once now so
    // a broken key stops startup rather than rejecting every token. The empty
    // signature itself is expected not to verify.
    jsonwebtoken::crypto::verify("", b"", &key, file.algorithm.algorithm()).map_err(|_| bad())?;
    Ok(key)
}

/// Claim checks shared by every key.
#[derive(Debug, Clone)]
struct ClaimRules {
    issuer: Option<String>,
    audience: Option<String>,
    leeway_secs: u64,
}

impl ClaimRules {
    fn validation(&self, algorithm: Algorithm) -> Validation {
        // Exactly one algorithm per key: this, not the token header, decides how the
        // signature is checked (no HS256-with-a-public-key confusion).
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            // Without this jsonwebtoken skips the issuer check when `iss` is absent.
            required.push("iss");
        }
        match &self.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                validation.validate_aud = true;
                required.push("aud");
            }
            // jsonwebtoken rejects any `aud` when none is expected; we have no
            // audience to compare with, so a token naming one is still ours.
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        validation
    }
}

/// One verification key and the only algorithm it verifies.
#[derive(Debug, Clone)]
struct VerificationKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
    validation: Validation,
}

impl VerificationKey {
    fn decode(&self, token: &str, header_alg: Algorithm) -> Result<Map<String, Value>, AuthError> {
        if header_alg != self.algorithm {
            return Err(AuthError::WrongAlgorithm);
        }
        // Claims are taken as a loose JSON object so that signature and time checks
        // run before our own claim checks (a typed struct would fail first).
        jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map(|data| data.claims)
            .map_err(|error| AuthError::from_jwt(&error))
    }
}

/// Verifies bearer tokens against the configured keys; cheap to share behind an `Arc`.
#[derive(Debug, Clone)]
pub struct Authenticator {
    keys: Vec<VerificationKey>,
}

impl Authenticator {
    /// Loads every key of the `[auth]` section; any unusable key is an error naming its file.
    pub fn new(config: &AuthConfig) -> Result<Self, AuthConfigError> {
        if config.leeway_secs > MAX_LEEWAY_SECS {
            return Err(AuthConfigError::LeewayTooLarge(config.leeway_secs));
        }
        if config.hs256.is_empty() && config.public_keys.is_empty() {
            return Err(AuthConfigError::NoKeys);
        }
        let rules = ClaimRules {
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            leeway_secs: config.leeway_secs,
        };
        let mut keys = Vec::with_capacity(config.hs256.len() + config.public_keys.len());
        for file in &config.hs256 {
            let secret = load_hs256_secret(&file.path)?;
            keys.push((
                file.kid.clone(),
                Algorithm::HS256,
                DecodingKey::from_secret(&secret),
            ));
        }
        for file in &config.public_keys {
            let key = load_public_key(file)?;
            keys.push((file.kid.clone(), file.algorithm.algorithm(), key));
        }
        Self::from_keys(keys, &rules)
    }

    /// One HS256 secret without `kid`, no `iss`/`aud` requirement and the default
    /// leeway: what `caskade local` and tests need without writing a config.
    pub fn with_hs256_secret(secret: &[u8]) -> Result<Self, AuthConfigError> {
        check_secret_length(Path::new(IN_MEMORY_SECRET), secret)?;
        let rules = ClaimRules {
            issuer: None,
            audience: None,
            leeway_secs: DEFAULT_LEEWAY_SECS,
        };
        Self::from_keys(
            vec![(None, Algorithm::HS256, DecodingKey::from_secret(secret))],
            &rules,
        )
    }

    fn from_keys(
        keys: Vec<(Option<String>, Algorithm, DecodingKey)>,
        rules: &ClaimRules,
    ) -> Result<Self, AuthConfigError> {
        let mut seen = std::collections::HashSet::new();
        for kid in keys.iter().filter_map(|(kid, _, _)| kid.as_deref()) {
            if !seen.insert(kid) {
                return Err(AuthConfigError::DuplicateKid {
                    kid: kid.to_owned(),
                });
            }
        }
        let keys = keys
            .into_iter()
            .map(|(kid, algorithm, key)| VerificationKey {
                kid,
                algorithm,
                key,
                validation: rules.validation(algorithm),
            })
            .collect();
        Ok(Self { keys })
    }

    /// Checks an `Authorization: Bearer <jwt>` header and returns who the token speaks for.
    pub fn authenticate(
        &self,
        authorization: Option<&HeaderValue>,
    ) -> Result<Principal, AuthError> {
        let result = self.verify(authorization);
        if let Err(error) = &result {
            tracing::debug!(reason = error.reason(), "bearer token rejected");
        }
        result
    }

    fn verify(&self, authorization: Option<&HeaderValue>) -> Result<Principal, AuthError> {
        let token = bearer_token(authorization)?;
        // Fails for `alg: none` (and any other algorithm jsonwebtoken does not know),
        // so an unsigned token never reaches key selection.
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        // RFC 7515 §4.1.11: extensions marked critical must be understood; we know none.
        if header.crit.is_some() {
            return Err(AuthError::Malformed);
        }
        let claims = match header.kid.as_deref() {
            Some(kid) => self
                .keys
                .iter()
                .find(|key| key.kid.as_deref() == Some(kid))
                .ok_or(AuthError::UnknownKey)?
                .decode(token, header.alg)?,
            None => self.decode_without_kid(token, header.alg)?,
        };
        Principal::from_claims(claims)
    }

    /// A token without `kid` may be signed by any kid-less key of its algorithm (two
    /// during a rotation); a signature mismatch moves on to the next one, any other
    /// failure is final.
    fn decode_without_kid(
        &self,
        token: &str,
        alg: Algorithm,
    ) -> Result<Map<String, Value>, AuthError> {
        let mut kidless = self.keys.iter().filter(|key| key.kid.is_none()).peekable();
        if kidless.peek().is_none() {
            return Err(AuthError::UnknownKey);
        }
        let mut outcome = Err(AuthError::WrongAlgorithm);
        for key in kidless.filter(|key| key.algorithm == alg) {
            outcome = key.decode(token, alg);
            if !matches!(outcome, Err(AuthError::BadSignature)) {
                break;
            }
        }
        outcome
    }
}

/// Extracts the token from `Bearer <token>` (scheme case-insensitive, one space).
fn bearer_token(authorization: Option<&HeaderValue>) -> Result<&str, AuthError> {
    const SCHEME: &[u8] = b"bearer ";
    let value = authorization.ok_or(AuthError::Missing)?.as_bytes();
    let token = match value.split_at_checked(SCHEME.len()) {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case(SCHEME) => token,
        _ => return Err(AuthError::NotBearer),
    };
    let is_jws_byte = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    if token.is_empty() || token.len() > MAX_TOKEN_BYTES || !token.iter().all(is_jws_byte) {
        return Err(AuthError::Malformed);
    }
    std::str::from_utf8(token).map_err(|_| AuthError::Malformed)
}

/// Why a request could not be authenticated. Every variant is HTTP 401 with the same
/// body; the variant is for logs and metrics only (see [`AuthError::reason`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header.
    #[error("no Authorization header")]
    Missing,
    /// The `Authorization` scheme is not `Bearer`.
    #[error("Authorization scheme is not Bearer")]
    NotBearer,
    /// The token is not a well-formed signed JWT (including `alg: none` and unknown algorithms).
    #[error("bearer token is not a well-formed signed JWT")]
    Malformed,
    /// The token's `kid` names no configured key, or it has no `kid` and no key lacks one.
    #[error("token names no configured key")]
    UnknownKey,
    /// The token's `alg` is not the algorithm of the key it selects.
    #[error("token algorithm does not match its key")]
    WrongAlgorithm,
    /// The signature does not verify with the selected key.
    #[error("token signature does not verify")]
    BadSignature,
    /// `exp` is in the past, beyond the leeway.
    #[error("token has expired")]
    Expired,
    /// `nbf` is in the future, beyond the leeway.
    #[error("token is not valid yet")]
    NotYetValid,
    /// `iss` is not the configured issuer.
    #[error("token issuer is not accepted")]
    WrongIssuer,
    /// `aud` does not name the configured audience.
    #[error("token audience is not accepted")]
    WrongAudience,
    /// A required claim is absent.
    #[error("token lacks the {0} claim")]
    MissingClaim(&'static str),
    /// A claim has the wrong type or an unknown value.
    #[error("token has an invalid {0} claim")]
    InvalidClaim(&'static str),
    /// The `prefix` claim is an empty string. Tokens for the whole keyspace
    /// have no `prefix` claim; an empty one is a mistake at issuance (such
    /// tokens were once accepted as unscoped), counted apart so that an
    /// operator can find the clients still holding one.
    #[error("token has an empty prefix claim")]
    EmptyPrefix,
    /// The configured key could not be used (checked at startup, so not expected).
    #[error("token could not be checked with the configured key")]
    Unverifiable,
}

impl AuthError {
    /// Stable snake_case label for metrics and logs; never sent to the client.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::NotBearer => "not_bearer",
            Self::Malformed => "malformed",
            Self::UnknownKey => "unknown_key",
            Self::WrongAlgorithm => "wrong_algorithm",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
            Self::MissingClaim(_) => "missing_claim",
            Self::InvalidClaim(_) => "invalid_claim",
            Self::EmptyPrefix => "empty_prefix",
            Self::Unverifiable => "unverifiable",
        }
    }

    fn from_jwt(error: &jsonwebtoken::errors::Error) -> Self {
        match error.kind() {
            ErrorKind::InvalidToken
            | ErrorKind::Base64(_)
            | ErrorKind::Json(_)
            | ErrorKind::Utf8(_) => Self::Malformed,
            ErrorKind::InvalidSignature => Self::BadSignature,
            ErrorKind::InvalidAlgorithm => Self::WrongAlgorithm,
            ErrorKind::ExpiredSignature => Self::Expired,
            ErrorKind::ImmatureSignature => Self::NotYetValid,
            ErrorKind::InvalidIssuer => Self::WrongIssuer,
            ErrorKind::InvalidAudience => Self::WrongAudience,
            ErrorKind::MissingRequiredClaim(claim) => Self::MissingClaim(spec_claim(claim)),
            ErrorKind::InvalidClaimFormat(claim) => Self::InvalidClaim(spec_claim(claim)),
            // Key-format and provider errors: the keys were probed at startup, and
            // `ErrorKind` is non-exhaustive, so anything else lands here.
            _ => Self::Unverifiable,
        }
    }
}

/// The registered claim names jsonwebtoken reports, as `'static` labels.
fn spec_claim(name: &str) -> &'static str {
    ["exp", "nbf", "iss", "aud", "sub"]
        .into_iter()
        .find(|known| *known == name)
        .unwrap_or("unknown")
}

/// Access levels, ordered: `Reader < Writer < Admin` (declaration order is the order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// May read keys and list prefixes.
    Reader,
    /// May also write and delete keys.
    Writer,
    /// May also use the admin API.
    Admin,
}

impl Role {
    /// The role's name as written in tokens and on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Reader => "reader",
            Self::Writer => "writer",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name other than `reader`, `writer` or `admin`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: expected reader, writer or admin")]
pub struct ParseRoleError(String);

impl FromStr for Role {
    type Err = ParseRoleError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "reader" => Ok(Self::Reader),
            "writer" => Ok(Self::Writer),
            "admin" => Ok(Self::Admin),
            _ => Err(ParseRoleError(name.to_owned())),
        }
    }
}

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's `sub`.
    pub subject: String,
    /// The token's `role`.
    pub role: Role,
    /// The token only covers keys starting with these bytes (`None`: the whole keyspace).
    pub prefix: Option<Vec<u8>>,
}

impl Principal {
    fn from_claims(mut claims: Map<String, Value>) -> Result<Self, AuthError> {
        let subject = match claims.remove("sub") {
            Some(Value::String(subject)) if !subject.is_empty() => subject,
            None | Some(Value::Null) => return Err(AuthError::MissingClaim("sub")),
            Some(_) => return Err(AuthError::InvalidClaim("sub")),
        };
        let role = match claims.get("role") {
            Some(Value::String(role)) => {
                role.parse().map_err(|_| AuthError::InvalidClaim("role"))?
            }
            None | Some(Value::Null) => return Err(AuthError::MissingClaim("role")),
            Some(_) => return Err(AuthError::InvalidClaim("role")),
        };
        let prefix = match claims.remove("prefix") {
            // No prefix claim is how a token covers every key. An empty one
            // would too, but says "scoped" while granting everything: refused.
            None | Some(Value::Null) => None,
            Some(Value::String(prefix)) if prefix.is_empty() => return Err(AuthError::EmptyPrefix),
            Some(Value::String(prefix)) => Some(prefix.into_bytes()),
            Some(_) => return Err(AuthError::InvalidClaim("prefix")),
        };
        Ok(Self {
            subject,
            role,
            prefix,
        })
    }

    /// Allows an operation needing `role` on `key` (None for routes not about one key).
    ///
    /// A prefix-scoped token is refused on routes not about one key (the admin API,
    /// cluster-wide operations): they reach beyond any prefix. Batch handlers must
    /// authorize each operation's key instead.
    pub fn authorize(&self, needed: Role, key: Option<&[u8]>) -> Result<(), Forbidden> {
        self.authorize_role(needed)?;
        match (&self.prefix, key) {
            (None, _) => Ok(()),
            (Some(prefix), Some(key)) if key.starts_with(prefix) => Ok(()),
            (Some(_), _) => Err(Forbidden::Prefix),
        }
    }

    /// Allows listing keys under `prefix` (the requested prefix must start with the token's prefix).
    pub fn authorize_prefix(&self, needed: Role, prefix: &[u8]) -> Result<(), Forbidden> {
        self.authorize_role(needed)?;
        match &self.prefix {
            Some(scope) if !prefix.starts_with(scope) => Err(Forbidden::Prefix),
            _ => Ok(()),
        }
    }

    fn authorize_role(&self, needed: Role) -> Result<(), Forbidden> {
        if self.role < needed {
            return Err(Forbidden::Role {
                needed,
                has: self.role,
            });
        }
        Ok(())
    }
}

/// Why an authenticated principal may not do what it asked: HTTP 403.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Forbidden {
    /// The token's role is below the one the operation needs.
    #[error("role {has} may not perform an operation that needs {needed}")]
    Role {
        /// The role the operation needs.
        needed: Role,
        /// The token's role.
        has: Role,
    },
    /// The key or prefix lies outside the token's prefix.
    #[error("the token does not cover this part of the keyspace")]
    Prefix,
}

impl Forbidden {
    /// Stable snake_case label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Role { .. } => "insufficient_role",
            Self::Prefix => "outside_prefix",
        }
    }
}

/// What to put in a token issued by [`issue_hs256`].
#[derive(Debug, Clone, Copy)]
pub struct TokenRequest<'a> {
    /// `sub`: who the token is for.
    pub subject: &'a str,
    /// `role`.
    pub role: Role,
    /// `prefix`: restrict the token to keys starting with it.
    pub prefix: Option<&'a str>,
    /// Lifetime: `exp = now + ttl` (whole seconds).
    pub ttl: Duration,
    /// `iss`, when the router requires one.
    pub issuer: Option<&'a str>,
    /// `aud`, when the router requires one.
    pub audience: Option<&'a str>,
    /// Header `kid`, when the router's secret has one.
    pub kid: Option<&'a str>,
}

#[derive(Serialize)]
struct IssuedClaims<'a> {
    sub: &'a str,
    role: Role,
    #[serde(skip_serializing_if = "Option::is_none")]
    prefix: Option<&'a str>,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// Signs an HS256 token for `caskade token` / `caskade local`, with `iat = now` and
/// `exp = now + ttl`. A secret shorter than [`MIN_HS256_SECRET_BYTES`] is refused
/// (`InvalidKeyFormat`), and so is an empty prefix (`InvalidClaimFormat`), since no
/// router would accept either.
pub fn issue_hs256(
    secret: &[u8],
    request: &TokenRequest<'_>,
) -> Result<String, jsonwebtoken::errors::Error> {
    if secret.len() < MIN_HS256_SECRET_BYTES {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    if request.prefix == Some("") {
        return Err(ErrorKind::InvalidClaimFormat("prefix".to_owned()).into());
    }
    let now = jsonwebtoken::get_current_timestamp();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = request.kid.map(str::to_owned);
    let claims = IssuedClaims {
        sub: request.subject,
        role: request.role,
        prefix: request.prefix,
        iat: now,
        exp: now.saturating_add(request.ttl.as_secs()),
        iss: request.issuer,
        aud: request.audience,
    };
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const OTHER_SECRET: &[u8] = b"fedcba9876543210fedcba9876543210";
    const ED_PRIVATE: &[u8] = include_bytes!("../tests/keys/ed25519-private.pem");
    const ED_PUBLIC: &[u8] = include_bytes!("../tests/keys/ed25519-public.pem");
    const ES_PRIVATE: &[u8] = include_bytes!("../tests/keys/es256-private.pem");
    const ES_PUBLIC: &[u8] = include_bytes!("../tests/keys/es256-public.pem");
    const RS_PRIVATE: &[u8] = include_bytes!("../tests/keys/rs256-private.pem");

    fn key_path(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/keys")
            .join(name)
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn claims(role: &str) -> Value {
        json!({ "sub": "alice", "role": role, "exp": now() + 600 })
    }

    fn with(mut claims: Value, field: &str, value: Value) -> Value {
        claims[field] = value;
        claims
    }

    fn without(mut claims: Value, field: &str) -> Value {
        claims
            .as_object_mut()
            .expect("test claims are an object")
            .remove(field);
        claims
    }

    fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, key).expect("test token signs")
    }

    fn hs256(secret: &[u8], kid: Option<&str>, claims: &Value) -> String {
        sign(
            Algorithm::HS256,
            kid,
            &EncodingKey::from_secret(secret),
            claims,
        )
    }

    fn check(auth: &Authenticator, token: &str) -> Result<Principal, AuthError> {
        let header = HeaderValue::from_str(&format!("Bearer {token}")).expect("token is ASCII");
        auth.authenticate(Some(&header))
    }

    fn check_raw(auth: &Authenticator, header: &[u8]) -> Result<Principal, AuthError> {
        let header = HeaderValue::from_bytes(header).expect("valid header bytes");
        auth.authenticate(Some(&header))
    }

    /// Writes `contents` to a file in `dir` and returns its path.
    fn write(dir: &tempfile::TempDir, name: &str, contents: &[u8]) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).expect("temp file writes");
        path
    }

    fn secret_file(kid: Option<&str>, path: PathBuf) -> SecretKeyFile {
        SecretKeyFile {
            kid: kid.map(str::to_owned),
            path,
        }
    }

    fn public_key(kid: Option<&str>, algorithm: AsymmetricAlgorithm, file: &str) -> PublicKeyFile {
        PublicKeyFile {
            kid: kid.map(str::to_owned),
            algorithm,
            path: key_path(file),
        }
    }

    /// HS256 kid-less + kid "hs-2", EdDSA kid "ed-1", ES256 kid "es-1", RS256 kid "rs-1".
    fn mixed(dir: &tempfile::TempDir) -> Authenticator {
        let config = AuthConfig {
            hs256: vec![
                secret_file(None, write(dir, "a", SECRET)),
                secret_file(Some("hs-2"), write(dir, "b", OTHER_SECRET)),
            ],
            public_keys: vec![
                public_key(
                    Some("ed-1"),
                    AsymmetricAlgorithm::EdDsa,
                    "ed25519-public.pem",
                ),
                public_key(Some("es-1"), AsymmetricAlgorithm::Es256, "es256-public.pem"),
                public_key(Some("rs-1"), AsymmetricAlgorithm::Rs256, "rs256-public.pem"),
            ],
            ..AuthConfig::default()
        };
        Authenticator::new(&config).expect("mixed config loads")
    }

    fn simple() -> Authenticator {
        Authenticator::with_hs256_secret(SECRET).expect("32-byte secret")
    }

    fn with_claim_rules(issuer: Option<&str>, audience: Option<&str>) -> Authenticator {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = AuthConfig {
            hs256: vec![secret_file(None, write(&dir, "s", SECRET))],
            issuer: issuer.map(str::to_owned),
            audience: audience.map(str::to_owned),
            ..AuthConfig::default()
        };
        Authenticator::new(&config).expect("config loads")
    }

    #[test]
    fn config_defaults_and_rejects_unknown_fields() {
        let config: AuthConfig = serde_json::from_value(json!({
            "hs256": [{ "path": "/s" }],
            "public_keys": [{ "kid": "k", "algorithm": "EdDSA", "path": "/p" }],
        }))
        .expect("minimal config parses");
        assert_eq!(config.leeway_secs, DEFAULT_LEEWAY_SECS);
        assert_eq!(config.issuer, None);
        assert_eq!(config.public_keys[0].algorithm, AsymmetricAlgorithm::EdDsa);
        for algorithm in ["ES256", "RS256"] {
            let file: PublicKeyFile =
                serde_json::from_value(json!({ "algorithm": algorithm, "path": "/p" }))
                    .expect("algorithm parses");
            assert_eq!(file.algorithm.to_string(), algorithm);
        }
        assert!(serde_json::from_value::<AuthConfig>(json!({ "leeway": 5 })).is_err());
        assert!(
            serde_json::from_value::<PublicKeyFile>(json!({ "algorithm": "HS256", "path": "/p" }))
                .is_err()
        );
        assert!(
            serde_json::from_value::<SecretKeyFile>(json!({ "path": "/s", "secret": "x" }))
                .is_err()
        );
    }

    #[test]
    fn secret_file_trailing_newline_is_trimmed() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, contents) in [("lf", b"\n".as_slice()), ("crlf", b"\r\n")] {
            let path = write(&dir, name, &[SECRET, contents].concat());
            assert_eq!(load_hs256_secret(&path).expect("secret loads"), SECRET);
            let config = AuthConfig {
                hs256: vec![secret_file(None, path)],
                ..AuthConfig::default()
            };
            let auth = Authenticator::new(&config).expect("config loads");
            assert!(check(&auth, &hs256(SECRET, None, &claims("reader"))).is_ok());
        }
    }

    #[test]
    fn config_errors_name_the_problem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let short = write(&dir, "short", &SECRET[..31]);
        let empty = write(&dir, "empty", b"\n");
        for path in [&short, &empty] {
            let config = AuthConfig {
                hs256: vec![secret_file(None, path.clone())],
                ..AuthConfig::default()
            };
            let error = Authenticator::new(&config).expect_err("short secret refused");
            assert!(matches!(&error, AuthConfigError::SecretTooShort { path: p, .. } if p == path));
            assert!(error.to_string().contains(&path.display().to_string()));
        }
        assert!(matches!(
            Authenticator::with_hs256_secret(&SECRET[..31]),
            Err(AuthConfigError::SecretTooShort { len: 31, .. })
        ));

        let missing = dir.path().join("nope");
        let config = AuthConfig {
            hs256: vec![secret_file(None, missing.clone())],
            ..AuthConfig::default()
        };
        let error = Authenticator::new(&config).expect_err("missing file refused");
        assert!(matches!(&error, AuthConfigError::Read { path, .. } if *path == missing));
        assert!(error.to_string().contains("nope"));

        assert!(matches!(
            Authenticator::new(&AuthConfig::default()),
            Err(AuthConfigError::NoKeys)
        ));

        let config = AuthConfig {
            hs256: vec![secret_file(Some("k"), write(&dir, "ok", SECRET))],
            public_keys: vec![public_key(
                Some("k"),
                AsymmetricAlgorithm::EdDsa,
                "ed25519-public.pem",
            )],
            ..AuthConfig::default()
        };
        assert!(matches!(
            Authenticator::new(&config),
            Err(AuthConfigError::DuplicateKid { kid }) if kid == "k"
        ));

        let config = AuthConfig {
            hs256: vec![secret_file(None, write(&dir, "ok2", SECRET))],
            leeway_secs: MAX_LEEWAY_SECS + 1,
            ..AuthConfig::default()
        };
        assert!(matches!(
            Authenticator::new(&config),
            Err(AuthConfigError::LeewayTooLarge(_))
        ));
    }

    #[test]
    fn public_keys_must_be_public_and_match_their_algorithm() {
        let load = |algorithm, file: &str| {
            Authenticator::new(&AuthConfig {
                public_keys: vec![public_key(None, algorithm, file)],
                ..AuthConfig::default()
            })
        };
        for (algorithm, private) in [
            (AsymmetricAlgorithm::EdDsa, "ed25519-private.pem"),
            (AsymmetricAlgorithm::Es256, "es256-private.pem"),
            (AsymmetricAlgorithm::Rs256, "rs256-private.pem"),
        ] {
            assert!(matches!(
                load(algorithm, private),
                Err(AuthConfigError::PrivateKey { .. })
            ));
        }
        for (algorithm, other) in [
            (AsymmetricAlgorithm::EdDsa, "es256-public.pem"),
            (AsymmetricAlgorithm::Es256, "ed25519-public.pem"),
            (AsymmetricAlgorithm::Es256, "rs256-public.pem"),
            (AsymmetricAlgorithm::Rs256, "ed25519-public.pem"),
        ] {
            assert!(
                matches!(
                    load(algorithm, other),
                    Err(AuthConfigError::BadPublicKey { .. })
                ),
                "{algorithm} accepted {other}"
            );
        }
    }

    #[test]
    fn header_must_be_a_bearer_token() {
        let auth = simple();
        assert_eq!(auth.authenticate(None), Err(AuthError::Missing));
        for header in [
            b"Basic YWxpY2U6c2VjcmV0".as_slice(),
            b"Bearer",
            b"Token abc",
            b"Bearerabc.def.ghi",
        ] {
            assert_eq!(check_raw(&auth, header), Err(AuthError::NotBearer));
        }
        let token = hs256(SECRET, None, &claims("reader"));
        for scheme in ["bearer", "BEARER", "bEaReR"] {
            let header = format!("{scheme} {token}");
            assert!(check_raw(&auth, header.as_bytes()).is_ok(), "{scheme}");
        }
        let doubled = format!("Bearer  {token}");
        let trailing = format!("Bearer {token} ");
        let oversized = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES + 1));
        for header in [
            b"Bearer ".as_slice(),
            doubled.as_bytes(),
            trailing.as_bytes(),
            oversized.as_bytes(),
            b"Bearer \xff\xfe",
        ] {
            assert_eq!(check_raw(&auth, header), Err(AuthError::Malformed));
        }
    }

    #[test]
    fn garbage_tokens_are_malformed() {
        let auth = simple();
        let valid = hs256(SECRET, None, &claims("reader"));
        for token in ["garbage", "a.b.c", "a.b", "....", &valid[..valid.len() / 3]] {
            assert_eq!(check(&auth, token), Err(AuthError::Malformed), "{token}");
        }
    }

    #[test]
    fn alg_none_is_rejected() {
        let auth = simple();
        let valid = hs256(SECRET, None, &claims("admin"));
        let payload = valid.split('.').nth(1).expect("payload segment");
        // base64url({"alg":"none","typ":"JWT"}) and with "kid":"x" too.
        for header in [
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0",
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIiwia2lkIjoieCJ9",
        ] {
            for signature in ["", "c2ln"] {
                let token = format!("{header}.{payload}.{signature}");
                assert_eq!(check(&auth, &token), Err(AuthError::Malformed));
            }
        }
    }

    #[test]
    fn critical_header_extensions_are_rejected() {
        let mut header = Header::new(Algorithm::HS256);
        header.crit = Some(vec!["exp".to_owned()]);
        let token = jsonwebtoken::encode(
            &header,
            &claims("reader"),
            &EncodingKey::from_secret(SECRET),
        )
        .expect("signs");
        assert_eq!(check(&simple(), &token), Err(AuthError::Malformed));
    }

    #[test]
    fn wrong_secret_is_a_bad_signature() {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = mixed(&dir);
        assert_eq!(
            check(&auth, &hs256(OTHER_SECRET, None, &claims("reader"))),
            Err(AuthError::BadSignature)
        );
        // Right kid, wrong secret (the kid-less one).
        assert_eq!(
            check(&auth, &hs256(SECRET, Some("hs-2"), &claims("reader"))),
            Err(AuthError::BadSignature)
        );
        // A different Ed25519-signed token's signature spliced onto these claims.
        let ed = EncodingKey::from_ed_pem(ED_PRIVATE).expect("ed key");
        let real = sign(Algorithm::EdDSA, Some("ed-1"), &ed, &claims("reader"));
        let other = sign(Algorithm::EdDSA, Some("ed-1"), &ed, &claims("admin"));
        let spliced = format!(
            "{}.{}",
            real.rsplit_once('.').expect("segments").0,
            other.rsplit_once('.').expect("segments").1
        );
        assert_eq!(check(&auth, &spliced), Err(AuthError::BadSignature));
    }

    #[test]
    fn expiry_is_required_and_enforced_with_leeway() {
        let auth = simple();
        let expired = with(claims("reader"), "exp", json!(now() - 3600));
        assert_eq!(
            check(&auth, &hs256(SECRET, None, &expired)),
            Err(AuthError::Expired)
        );
        let within_leeway = with(claims("reader"), "exp", json!(now() - 5));
        assert!(check(&auth, &hs256(SECRET, None, &within_leeway)).is_ok());
        assert_eq!(
            check(
                &auth,
                &hs256(SECRET, None, &without(claims("reader"), "exp"))
            ),
            Err(AuthError::MissingClaim("exp"))
        );
        let not_a_number = with(claims("reader"), "exp", json!("tomorrow"));
        assert_eq!(
            check(&auth, &hs256(SECRET, None, &not_a_number)),
            Err(AuthError::MissingClaim("exp"))
        );
    }

    #[test]
    fn not_before_is_enforced() {
        let auth = simple();
        let future = with(claims("reader"), "nbf", json!(now() + 3600));
        assert_eq!(
            check(&auth, &hs256(SECRET, None, &future)),
            Err(AuthError::NotYetValid)
        );
        let past = with(claims("reader"), "nbf", json!(now() - 10));
        assert!(check(&auth, &hs256(SECRET, None, &past)).is_ok());
    }

    #[test]
    fn unknown_kid_is_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = mixed(&dir);
        assert_eq!(
            check(&auth, &hs256(SECRET, Some("nope"), &claims("reader"))),
            Err(AuthError::UnknownKey)
        );
        // A kid-less token when every key has a kid.
        let only_kids = Authenticator::new(&AuthConfig {
            hs256: vec![secret_file(Some("k1"), write(&dir, "k1", SECRET))],
            ..AuthConfig::default()
        })
        .expect("config loads");
        assert_eq!(
            check(&only_kids, &hs256(SECRET, None, &claims("reader"))),
            Err(AuthError::UnknownKey)
        );
    }

    #[test]
    fn algorithm_confusion_is_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = mixed(&dir);
        // The classic attack: HMAC-sign with the public key bytes as secret, and
        // name the asymmetric key so a naive verifier uses them as the HMAC key.
        for (kid, public) in [("ed-1", ED_PUBLIC), ("es-1", ES_PUBLIC)] {
            let token = hs256(public, Some(kid), &claims("admin"));
            assert_eq!(
                check(&auth, &token),
                Err(AuthError::WrongAlgorithm),
                "{kid}"
            );
        }
        // Same without kid, against a kid-less EdDSA key.
        let ed_only = Authenticator::new(&AuthConfig {
            public_keys: vec![public_key(
                None,
                AsymmetricAlgorithm::EdDsa,
                "ed25519-public.pem",
            )],
            ..AuthConfig::default()
        })
        .expect("config loads");
        assert_eq!(
            check(&ed_only, &hs256(ED_PUBLIC, None, &claims("admin"))),
            Err(AuthError::WrongAlgorithm)
        );
        // A real signature under another algorithm of the HMAC family is refused too.
        let hs384 = sign(
            Algorithm::HS384,
            Some("hs-2"),
            &EncodingKey::from_secret(OTHER_SECRET),
            &claims("reader"),
        );
        assert_eq!(check(&auth, &hs384), Err(AuthError::WrongAlgorithm));
        // An ES256 token naming the EdDSA key.
        let es = EncodingKey::from_ec_pem(ES_PRIVATE).expect("es key");
        let token = sign(Algorithm::ES256, Some("ed-1"), &es, &claims("reader"));
        assert_eq!(check(&auth, &token), Err(AuthError::WrongAlgorithm));
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let auth = with_claim_rules(Some("caskade"), Some("kv"));
        let good = with(
            with(claims("reader"), "iss", json!("caskade")),
            "aud",
            json!("kv"),
        );
        assert!(check(&auth, &hs256(SECRET, None, &good)).is_ok());
        let many_audiences = with(good.clone(), "aud", json!(["other", "kv"]));
        assert!(check(&auth, &hs256(SECRET, None, &many_audiences)).is_ok());

        let cases = [
            (
                with(good.clone(), "iss", json!("evil")),
                AuthError::WrongIssuer,
            ),
            (without(good.clone(), "iss"), AuthError::MissingClaim("iss")),
            (
                with(good.clone(), "aud", json!("other")),
                AuthError::WrongAudience,
            ),
            (
                with(good.clone(), "aud", json!(["a", "b"])),
                AuthError::WrongAudience,
            ),
            (without(good.clone(), "aud"), AuthError::MissingClaim("aud")),
        ];
        for (claims, expected) in cases {
            assert_eq!(
                check(&auth, &hs256(SECRET, None, &claims)),
                Err(expected),
                "{claims}"
            );
        }
    }

    #[test]
    fn issuer_and_audience_are_ignored_when_not_configured() {
        let auth = simple();
        let claims = with(with(claims("reader"), "iss", json!("x")), "aud", json!("y"));
        assert!(check(&auth, &hs256(SECRET, None, &claims)).is_ok());
        let list = with(claims, "aud", json!(["y", "z"]));
        assert!(check(&auth, &hs256(SECRET, None, &list)).is_ok());
    }

    #[test]
    fn subject_role_and_prefix_claims_are_validated() {
        let auth = simple();
        let cases = [
            (
                without(claims("reader"), "role"),
                AuthError::MissingClaim("role"),
            ),
            (claims("root"), AuthError::InvalidClaim("role")),
            (claims("Admin"), AuthError::InvalidClaim("role")),
            (
                with(claims("reader"), "role", json!(3)),
                AuthError::InvalidClaim("role"),
            ),
            (
                without(claims("reader"), "sub"),
                AuthError::MissingClaim("sub"),
            ),
            (
                with(claims("reader"), "sub", json!("")),
                AuthError::InvalidClaim("sub"),
            ),
            (
                with(claims("reader"), "sub", json!(7)),
                AuthError::InvalidClaim("sub"),
            ),
            (
                with(claims("reader"), "prefix", json!(["a"])),
                AuthError::InvalidClaim("prefix"),
            ),
        ];
        for (claims, expected) in cases {
            assert_eq!(
                check(&auth, &hs256(SECRET, None, &claims)),
                Err(expected),
                "{claims}"
            );
        }
    }

    #[test]
    fn accepted_tokens_yield_their_principal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = mixed(&dir);
        let scoped = with(claims("writer"), "prefix", json!("tenant-a/"));
        let expected = Principal {
            subject: "alice".to_owned(),
            role: Role::Writer,
            prefix: Some(b"tenant-a/".to_vec()),
        };
        let ed = EncodingKey::from_ed_pem(ED_PRIVATE).expect("ed key");
        let es = EncodingKey::from_ec_pem(ES_PRIVATE).expect("es key");
        let rs = EncodingKey::from_rsa_pem(RS_PRIVATE).expect("rs key");
        let tokens = [
            hs256(SECRET, None, &scoped),
            hs256(OTHER_SECRET, Some("hs-2"), &scoped),
            sign(Algorithm::EdDSA, Some("ed-1"), &ed, &scoped),
            sign(Algorithm::ES256, Some("es-1"), &es, &scoped),
            sign(Algorithm::RS256, Some("rs-1"), &rs, &scoped),
        ];
        for token in &tokens {
            assert_eq!(check(&auth, token).as_ref(), Ok(&expected), "{token}");
        }
        let whole = check(&auth, &hs256(SECRET, None, &claims("admin"))).expect("accepted");
        assert_eq!((whole.role, whole.prefix), (Role::Admin, None));
    }

    #[test]
    fn an_empty_prefix_claim_is_refused() {
        // No prefix claim is how a token covers every key; an empty one is a
        // mistake (`--prefix ""`) that must not silently grant everything.
        let auth = simple();
        for role in ["reader", "writer", "admin"] {
            let empty = with(claims(role), "prefix", json!(""));
            assert_eq!(
                check(&auth, &hs256(SECRET, None, &empty)),
                Err(AuthError::EmptyPrefix),
                "{role}"
            );
        }
        assert_eq!(AuthError::EmptyPrefix.reason(), "empty_prefix");
    }

    #[test]
    fn rotation_accepts_old_and_new_secrets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let with_kids = Authenticator::new(&AuthConfig {
            hs256: vec![
                secret_file(Some("2024"), write(&dir, "old", SECRET)),
                secret_file(Some("2025"), write(&dir, "new", OTHER_SECRET)),
            ],
            ..AuthConfig::default()
        })
        .expect("config loads");
        assert!(check(&with_kids, &hs256(SECRET, Some("2024"), &claims("reader"))).is_ok());
        assert!(
            check(
                &with_kids,
                &hs256(OTHER_SECRET, Some("2025"), &claims("reader"))
            )
            .is_ok()
        );

        // Kid-less secrets are tried in turn; any other failure is still final.
        let kidless = Authenticator::new(&AuthConfig {
            hs256: vec![
                secret_file(None, write(&dir, "old2", SECRET)),
                secret_file(None, write(&dir, "new2", OTHER_SECRET)),
            ],
            ..AuthConfig::default()
        })
        .expect("config loads");
        assert!(check(&kidless, &hs256(SECRET, None, &claims("reader"))).is_ok());
        assert!(check(&kidless, &hs256(OTHER_SECRET, None, &claims("reader"))).is_ok());
        let expired = with(claims("reader"), "exp", json!(now() - 3600));
        assert_eq!(
            check(&kidless, &hs256(OTHER_SECRET, None, &expired)),
            Err(AuthError::Expired)
        );
        let third: &[u8] = b"another-secret-of-thirty-two-b!!";
        assert_eq!(
            check(&kidless, &hs256(third, None, &claims("reader"))),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn roles_are_ordered_and_named() {
        assert!(Role::Reader < Role::Writer && Role::Writer < Role::Admin);
        for role in [Role::Reader, Role::Writer, Role::Admin] {
            assert_eq!(role.to_string().parse::<Role>(), Ok(role));
            let json = serde_json::to_value(role).expect("serializes");
            assert_eq!(json, json!(role.as_str()));
            assert_eq!(serde_json::from_value::<Role>(json).ok(), Some(role));
        }
        assert!("superuser".parse::<Role>().is_err());
        assert!("Reader".parse::<Role>().is_err());
    }

    fn principal(role: Role, prefix: Option<&str>) -> Principal {
        Principal {
            subject: "alice".to_owned(),
            role,
            prefix: prefix.map(|p| p.as_bytes().to_vec()),
        }
    }

    #[test]
    fn authorize_enforces_role_order() {
        let reader = principal(Role::Reader, None);
        let writer = principal(Role::Writer, None);
        let admin = principal(Role::Admin, None);
        let key = Some(b"k".as_slice());
        assert_eq!(reader.authorize(Role::Reader, key), Ok(()));
        assert_eq!(
            reader.authorize(Role::Writer, key),
            Err(Forbidden::Role {
                needed: Role::Writer,
                has: Role::Reader
            })
        );
        assert_eq!(writer.authorize(Role::Writer, key), Ok(()));
        assert_eq!(
            writer.authorize(Role::Admin, None),
            Err(Forbidden::Role {
                needed: Role::Admin,
                has: Role::Writer
            })
        );
        for needed in [Role::Reader, Role::Writer, Role::Admin] {
            assert_eq!(admin.authorize(needed, key), Ok(()));
            assert_eq!(admin.authorize(needed, None), Ok(()));
            assert_eq!(admin.authorize_prefix(needed, b""), Ok(()));
        }
        assert_eq!(
            reader
                .authorize_prefix(Role::Writer, b"a")
                .map_err(|f| f.reason()),
            Err("insufficient_role")
        );
    }

    #[test]
    fn prefix_scoped_tokens_stay_in_their_prefix() {
        let scoped = principal(Role::Admin, Some("tenant-a/"));
        assert_eq!(scoped.authorize(Role::Writer, Some(b"tenant-a/x")), Ok(()));
        assert_eq!(scoped.authorize(Role::Writer, Some(b"tenant-a/")), Ok(()));
        for key in [b"tenant-b/x".as_slice(), b"tenant-a", b"", b"x/tenant-a/"] {
            assert_eq!(
                scoped.authorize(Role::Reader, Some(key)),
                Err(Forbidden::Prefix)
            );
        }
        // Routes not about one key reach beyond any prefix.
        assert_eq!(scoped.authorize(Role::Admin, None), Err(Forbidden::Prefix));

        assert_eq!(scoped.authorize_prefix(Role::Reader, b"tenant-a/"), Ok(()));
        assert_eq!(
            scoped.authorize_prefix(Role::Reader, b"tenant-a/sub"),
            Ok(())
        );
        for prefix in [b"".as_slice(), b"tenant-", b"tenant-a", b"tenant-b/"] {
            assert_eq!(
                scoped.authorize_prefix(Role::Reader, prefix),
                Err(Forbidden::Prefix)
            );
        }
        // The role check still applies inside the prefix.
        let reader = principal(Role::Reader, Some("p/"));
        assert!(matches!(
            reader.authorize(Role::Writer, Some(b"p/x")),
            Err(Forbidden::Role { .. })
        ));
        assert_eq!(Forbidden::Prefix.reason(), "outside_prefix");
    }

    #[test]
    fn issued_tokens_round_trip() {
        let request = TokenRequest {
            subject: "ops",
            role: Role::Writer,
            prefix: Some("logs/"),
            ttl: Duration::from_secs(3600),
            issuer: Some("caskade"),
            audience: Some("kv"),
            kid: None,
        };
        let token = issue_hs256(SECRET, &request).expect("issues");
        let principal = check(&with_claim_rules(Some("caskade"), Some("kv")), &token)
            .expect("issued token is accepted");
        assert_eq!(principal, principal_for("ops", Role::Writer, Some("logs/")));

        let header = jsonwebtoken::decode_header(&token).expect("header");
        assert_eq!((header.alg, header.kid), (Algorithm::HS256, None));
        let claims: Value =
            jsonwebtoken::dangerous::insecure_decode_claims(&token).expect("claims");
        let (iat, exp) = (claims["iat"].as_u64(), claims["exp"].as_u64());
        assert_eq!(exp.zip(iat).map(|(e, i)| e - i), Some(3600));

        let minimal = TokenRequest {
            prefix: None,
            issuer: None,
            audience: None,
            kid: Some("hs-2"),
            ..request
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let token = issue_hs256(OTHER_SECRET, &minimal).expect("issues");
        assert_eq!(
            check(&mixed(&dir), &token),
            Ok(principal_for("ops", Role::Writer, None))
        );

        assert!(issue_hs256(&SECRET[..16], &request).is_err());
        let empty_prefix = TokenRequest {
            prefix: Some(""),
            ..request
        };
        assert!(issue_hs256(SECRET, &empty_prefix).is_err());
    }

    fn principal_for(subject: &str, role: Role, prefix: Option<&str>) -> Principal {
        Principal {
            subject: subject.to_owned(),
            ..principal(role, prefix)
        }
    }

    #[test]
    fn reasons_are_distinct_snake_case_labels() {
        let all = [
            AuthError::Missing,
            AuthError::NotBearer,
            AuthError::Malformed,
            AuthError::UnknownKey,
            AuthError::WrongAlgorithm,
            AuthError::BadSignature,
            AuthError::Expired,
            AuthError::NotYetValid,
            AuthError::WrongIssuer,
            AuthError::WrongAudience,
            AuthError::MissingClaim("exp"),
            AuthError::InvalidClaim("role"),
            AuthError::EmptyPrefix,
            AuthError::Unverifiable,
        ];
        let reasons: std::collections::HashSet<_> = all.iter().map(AuthError::reason).collect();
        assert_eq!(reasons.len(), all.len());
        for reason in reasons {
            assert!(
                reason.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{reason}"
            );
        }
    }
}
