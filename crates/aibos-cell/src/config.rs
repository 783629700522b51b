//! The environment variables a cell reads, and what is wrong when they are wrong.
//!
//! Both [`AssertionVerifier`](crate::AssertionVerifier) and
//! [`KernelClient`](crate::KernelClient) can be built from arguments or from the
//! environment; either way a mistake is reported once, at start-up, as a
//! [`ConfigError`] that never quotes a secret.

/// The canon's name as registered with the kernel: the `aud` of its assertions.
pub const ENV_CANON_NAME: &str = "AIBOS_CANON_NAME";
/// The canon's assertion secrets, comma-separated (two during a rotation).
pub const ENV_ASSERTION_SECRETS: &str = "AIBOS_ASSERTION_SECRETS";
/// The kernel's base URL, e.g. `http://127.0.0.1:3001`.
pub const ENV_KERNEL_URL: &str = "AIBOS_KERNEL_URL";
/// The cell's service-account client id.
pub const ENV_CLIENT_ID: &str = "AIBOS_CLIENT_ID";
/// The cell's service-account client secret.
pub const ENV_CLIENT_SECRET: &str = "AIBOS_CLIENT_SECRET";

/// A configuration mistake, found when the verifier or the client is built.
///
/// No variant carries a secret: a bad secret is named by its position in the list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A required environment variable is unset or not valid Unicode.
    #[error("environment variable {0} is not set")]
    MissingEnv(&'static str),
    /// The canon name is empty, too long or not printable ASCII.
    #[error("the canon name must be 1 to 255 printable ASCII characters without spaces")]
    InvalidCanonName,
    /// The issuer is empty, too long or not printable ASCII.
    #[error("the issuer must be 1 to 255 printable ASCII characters without spaces")]
    InvalidIssuer,
    /// No assertion secret was given.
    #[error("at least one assertion secret is required")]
    NoSecrets,
    /// More secrets than a rotation ever needs.
    #[error("at most {max} assertion secrets may be configured, {given} were given")]
    TooManySecrets {
        /// How many were given.
        given: usize,
        /// [`SECRETS_MAX`](crate::assertion::SECRETS_MAX).
        max: usize,
    },
    /// A secret is not of the form `kas_<16 lowercase hex>_<random>`.
    #[error(
        "assertion secret #{position} (counting from 1) is not of the form kas_<16 lowercase hex>_<random>"
    )]
    InvalidSecret {
        /// 1-based position in the list, so the secret itself is never printed.
        position: usize,
    },
    /// Two different secrets name the same kid, so a token's `kid` could not pick one.
    #[error("two different assertion secrets have the kid {kid}")]
    DuplicateKid {
        /// The kid (public: it travels in every token header).
        kid: String,
    },
    /// The clock leeway exceeds what an assertion's lifetime allows.
    #[error("the clock leeway must be at most {max_seconds} s, {given_seconds} s was given")]
    LeewayTooLarge {
        /// The leeway asked for.
        given_seconds: u64,
        /// [`LEEWAY_MAX_SECONDS`](crate::assertion::LEEWAY_MAX_SECONDS).
        max_seconds: u64,
    },
    /// The replay cache's size is zero or above its bound.
    #[error("the replay cache holds 1 to {max} assertions, {given} was given")]
    ReplayCacheSize {
        /// The size asked for.
        given: usize,
        /// [`REPLAY_CACHE_ENTRIES_MAX`](crate::assertion::REPLAY_CACHE_ENTRIES_MAX).
        max: usize,
    },
    /// The kernel URL does not parse, or uses a scheme this client cannot speak.
    #[error("invalid kernel URL: {0}")]
    InvalidKernelUrl(String),
    /// The client id or client secret is empty or cannot travel in JSON as given.
    #[error("invalid service-account credentials: {0}")]
    InvalidCredentials(&'static str),
    /// The HTTP client could not be built.
    #[error("could not build the HTTP client: {0}")]
    HttpClient(String),
}

/// Reads a required environment variable.
pub(crate) fn required_env(name: &'static str) -> Result<String, ConfigError> {
    std::env::var(name).map_err(|_| ConfigError::MissingEnv(name))
}

/// True for a non-empty name of at most 255 printable ASCII characters without spaces:
/// what a canon name or an issuer can be on the wire, whatever the kernel's own rules.
pub(crate) fn is_printable_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.bytes().all(|b| b.is_ascii_graphic())
}
