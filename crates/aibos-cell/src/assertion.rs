//! Verifying the kernel's `x-kernel-assertion`: the proof that a call came through
//! the kernel's gateway, for this canon, this method and this path.
//!
//! The checks run in this order, each refusing with its own [`AssertionError`]:
//!
//! 1. exactly one `x-kernel-assertion` header, at most [`ASSERTION_BYTES_MAX`] bytes,
//!    three base64url segments;
//! 2. the JOSE header: `alg` is `HS256` (pinned: `none` and every other algorithm
//!    are refused), no `crit`, and `kid` names one of the configured secrets;
//! 3. the HMAC-SHA256 signature with that secret, then `iss` and `aud`;
//! 4. time: `exp` not passed and `iat` not in the future, each with the leeway;
//! 5. `htm` equals the request's method and `htu` its path and query, byte for byte;
//! 6. the plain identity headers, where present, equal the signed claims;
//! 7. `act` is `user` or `service`, `cid` is a UUID, `tid` and `sub` are not empty;
//! 8. `jti` is a UUID not seen before by this verifier (or its clones) within the
//!    assertion's lifetime: each call through the kernel is accepted once.
//!
//! The detailed reason is for the cell's logs; callers see one uniform 401
//! (see [`crate::extract`]).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use aibos_wire::CorrelationId;
use aibos_wire::assertion::{
    ACTOR_TYPE_HEADER, ASSERTION_ALGORITHM, ASSERTION_HEADER, ASSERTION_LIFETIME_SECONDS,
    AssertionClaims, FORWARDED_FOR_HEADER, KID_LEN, TENANT_HEADER, USER_HEADER, secret_kid,
};
use aibos_wire::correlation::{CORRELATION_HEADER, TRACEPARENT_HEADER, TraceParent};
use aibos_wire::jws::{self, JwsError, Validation, VerifyingKey};
use http::{HeaderMap, Method};

use crate::config::{
    ConfigError, ENV_ASSERTION_SECRETS, ENV_CANON_NAME, is_printable_name, required_env,
};

/// The issuer the kernel puts in `iss`.
pub const DEFAULT_ISSUER: &str = "aibos-kernel";

/// Default clock leeway, in seconds, applied to `exp` and `iat`.
///
/// Five seconds absorbs ordinary NTP drift between the kernel's host and the
/// cell's while keeping a captured assertion useful for at most
/// [`ASSERTION_LIFETIME_SECONDS`] + 5 s.
pub const DEFAULT_LEEWAY_SECONDS: u64 = 5;

/// The largest leeway [`AssertionVerifier::with_leeway_seconds`] accepts: beyond an
/// assertion's own lifetime the expiry check would stop meaning anything.
pub const LEEWAY_MAX_SECONDS: u64 = ASSERTION_LIFETIME_SECONDS as u64;

/// The largest `x-kernel-assertion` value looked at, in bytes.
///
/// It bounds the base64 and JSON work done on an unauthenticated header. The
/// token carries the path and query (`htu`) twice over in base64, so this leaves
/// room for a path and query of about 10 KiB, more than any route needs.
pub const ASSERTION_BYTES_MAX: usize = 16 * 1024;

/// The most secrets one verifier holds. A rotation needs two; a few more allow
/// an overlapping second rotation, and anything beyond is a misconfiguration.
pub const SECRETS_MAX: usize = 8;

/// The most assertions a verifier remembers to refuse their replay: the calls
/// of one assertion lifetime plus leeway (65 s), about 16 000 calls a second
/// sustained. An entry is a timestamp and a 128-bit id in a B-tree (a 32-byte
/// key, about 50 bytes with the nodes' overhead), so a full cache holds some
/// 50 MiB. When full, expired entries go
/// first; if it is still full the call is refused rather than an unexpired
/// entry forgotten, since forgetting one would let its assertion be replayed.
/// [`AssertionVerifier::with_replay_cache_entries`] sets a smaller size.
pub const REPLAY_CACHE_ENTRIES_MAX: usize = 1 << 20;

/// Verifies `x-kernel-assertion` headers for one canon.
///
/// Cheap to clone (the keys sit behind an `Arc`), so it can be axum state
/// directly; the [`KernelCall`] extractor takes it through `FromRef`.
///
/// `Debug` lists the canon, the issuer, the leeway and the kids, never a secret.
#[derive(Clone)]
pub struct AssertionVerifier {
    inner: Arc<Inner>,
}

#[derive(Clone)]
struct Inner {
    /// The canon's name: the only `aud` accepted.
    canon: String,
    /// The only `iss` accepted.
    issuer: String,
    /// Allowed clock difference for `exp` and `iat`, in seconds.
    leeway_seconds: u64,
    /// HMAC keys by kid. The secret string itself is kept only inside the key.
    keys: HashMap<String, VerifyingKey>,
    /// The kids in configuration order, for `Debug` and logs.
    kids: Vec<String>,
    /// Checks `aud` and `iss` (the keys pin HS256); time is checked by
    /// `verify_at` itself, so that errors name the claim and the clocks.
    validation: Validation,
    /// The `jti`s accepted and not yet expired, shared by every clone.
    seen: Arc<ReplayCache>,
}

/// The assertions accepted within their lifetime, by `(exp, jti)`: a replay
/// carries the same signed `exp`, and ordering by it lets expired entries be
/// dropped from the front as time passes, each once.
struct ReplayCache {
    capacity: usize,
    entries: Mutex<BTreeSet<(i64, u128)>>,
}

impl ReplayCache {
    fn new(capacity: usize) -> ReplayCache {
        ReplayCache {
            capacity,
            entries: Mutex::new(BTreeSet::new()),
        }
    }

    /// Records `(exp, jti)` as used at `now`; refuses one already used, or any
    /// when the cache is full of unexpired entries. Entries whose `exp` plus
    /// `leeway` has passed are dropped first: their assertions are refused as
    /// expired anyway.
    fn record(&self, exp: i64, jti: u128, now: i64, leeway: i64) -> Result<(), AssertionError> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(&(oldest, _)) = entries.first()
            && oldest.saturating_add(leeway) < now
        {
            entries.pop_first();
        }
        if entries.contains(&(exp, jti)) {
            return Err(AssertionError::Replayed);
        }
        if entries.len() >= self.capacity {
            return Err(AssertionError::ReplayCacheFull {
                entries: entries.len(),
            });
        }
        entries.insert((exp, jti));
        Ok(())
    }
}

impl AssertionVerifier {
    /// A verifier for the canon `canon` (its registered name) holding `secrets`
    /// (`kas_<kid>_<random>`; two of them during a rotation).
    ///
    /// Refuses an empty list, a secret whose kid cannot be read, and two
    /// different secrets with the same kid. The issuer is [`DEFAULT_ISSUER`] and
    /// the leeway [`DEFAULT_LEEWAY_SECONDS`]; see [`with_issuer`](Self::with_issuer)
    /// and [`with_leeway_seconds`](Self::with_leeway_seconds).
    pub fn new(
        canon: impl Into<String>,
        secrets: impl IntoIterator<Item = String>,
    ) -> Result<AssertionVerifier, ConfigError> {
        let canon = canon.into();
        if !is_printable_name(&canon) {
            return Err(ConfigError::InvalidCanonName);
        }
        let secrets: Vec<String> = secrets.into_iter().collect();
        if secrets.is_empty() {
            return Err(ConfigError::NoSecrets);
        }
        if secrets.len() > SECRETS_MAX {
            return Err(ConfigError::TooManySecrets {
                given: secrets.len(),
                max: SECRETS_MAX,
            });
        }
        // Keep the secret text per kid only long enough to detect a duplicate kid.
        let mut by_kid: HashMap<String, &str> = HashMap::new();
        let mut kids = Vec::new();
        for (index, secret) in secrets.iter().enumerate() {
            let kid = secret_kid(secret).ok_or(ConfigError::InvalidSecret {
                position: index + 1,
            })?;
            match by_kid.get(kid) {
                // The same secret listed twice (say, during a hurried redeploy) is harmless.
                Some(existing) if *existing == secret.as_str() => {}
                Some(_) => {
                    return Err(ConfigError::DuplicateKid {
                        kid: kid.to_owned(),
                    });
                }
                None => {
                    by_kid.insert(kid.to_owned(), secret);
                    kids.push(kid.to_owned());
                }
            }
        }
        let keys = by_kid
            .into_iter()
            .map(|(kid, secret)| (kid, VerifyingKey::hs256(secret.as_bytes())))
            .collect();
        let issuer = DEFAULT_ISSUER.to_owned();
        let validation = validation(&canon, &issuer);
        Ok(AssertionVerifier {
            inner: Arc::new(Inner {
                canon,
                issuer,
                leeway_seconds: DEFAULT_LEEWAY_SECONDS,
                keys,
                kids,
                validation,
                seen: Arc::new(ReplayCache::new(REPLAY_CACHE_ENTRIES_MAX)),
            }),
        })
    }

    /// A verifier from [`ENV_CANON_NAME`] (`AIBOS_CANON_NAME`) and
    /// [`ENV_ASSERTION_SECRETS`] (`AIBOS_ASSERTION_SECRETS`, comma-separated;
    /// spaces around each secret and empty entries are ignored).
    pub fn from_env() -> Result<AssertionVerifier, ConfigError> {
        let canon = required_env(ENV_CANON_NAME)?;
        let secrets = required_env(ENV_ASSERTION_SECRETS)?;
        AssertionVerifier::new(canon.trim(), split_secrets(&secrets))
    }

    /// Expects `issuer` in `iss` instead of [`DEFAULT_ISSUER`] (for a kernel
    /// configured with another issuer name).
    pub fn with_issuer(mut self, issuer: impl Into<String>) -> Result<Self, ConfigError> {
        let issuer = issuer.into();
        if !is_printable_name(&issuer) {
            return Err(ConfigError::InvalidIssuer);
        }
        let inner = Arc::make_mut(&mut self.inner);
        inner.validation = validation(&inner.canon, &issuer);
        inner.issuer = issuer;
        Ok(self)
    }

    /// Allows `leeway_seconds` of clock difference on `exp` and `iat` instead of
    /// [`DEFAULT_LEEWAY_SECONDS`]; at most [`LEEWAY_MAX_SECONDS`].
    pub fn with_leeway_seconds(mut self, leeway_seconds: u64) -> Result<Self, ConfigError> {
        if leeway_seconds > LEEWAY_MAX_SECONDS {
            return Err(ConfigError::LeewayTooLarge {
                given_seconds: leeway_seconds,
                max_seconds: LEEWAY_MAX_SECONDS,
            });
        }
        Arc::make_mut(&mut self.inner).leeway_seconds = leeway_seconds;
        Ok(self)
    }

    /// Remembers at most `entries` assertions against replay instead of
    /// [`REPLAY_CACHE_ENTRIES_MAX`] (1 to that bound); the ones remembered so far
    /// are forgotten. A cell serving fewer calls needs less memory for it.
    pub fn with_replay_cache_entries(mut self, entries: usize) -> Result<Self, ConfigError> {
        if entries == 0 || entries > REPLAY_CACHE_ENTRIES_MAX {
            return Err(ConfigError::ReplayCacheSize {
                given: entries,
                max: REPLAY_CACHE_ENTRIES_MAX,
            });
        }
        Arc::make_mut(&mut self.inner).seen = Arc::new(ReplayCache::new(entries));
        Ok(self)
    }

    /// The canon name this verifier accepts as `aud`.
    pub fn canon(&self) -> &str {
        &self.inner.canon
    }

    /// The kids of the configured secrets, in configuration order.
    pub fn kids(&self) -> &[String] {
        &self.inner.kids
    }

    /// Verifies the assertion of a request with `method`, `path_and_query` (as
    /// the cell received it: `/payments/42?expand=ledger`, or just the path when
    /// there is no query) and `headers`, against the system clock.
    pub fn verify(
        &self,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
    ) -> Result<KernelCall, AssertionError> {
        self.verify_at(method, path_and_query, headers, unix_now_seconds())
    }

    /// [`verify`](Self::verify) at a given time (seconds since the epoch).
    pub(crate) fn verify_at(
        &self,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        now_seconds: i64,
    ) -> Result<KernelCall, AssertionError> {
        let token = single_assertion(headers)?;
        let key = self.key_for(token)?;
        let claims =
            jws::verify::<AssertionClaims>(token, key, &self.inner.validation, now_seconds)
                .map_err(AssertionError::from_jws)?;

        // A signed time can still be absurd; saturate rather than overflow.
        let leeway = i64::try_from(self.inner.leeway_seconds).unwrap_or(i64::MAX);
        if claims.exp.saturating_add(leeway) < now_seconds {
            return Err(AssertionError::Expired {
                exp: claims.exp,
                now: now_seconds,
            });
        }
        if claims.iat.saturating_sub(leeway) > now_seconds {
            return Err(AssertionError::IssuedInFuture {
                iat: claims.iat,
                now: now_seconds,
            });
        }
        // The kernel signs for exactly this long; a longer one would also sit in
        // the replay cache for longer than its bound assumes.
        if claims.exp.saturating_sub(claims.iat) > ASSERTION_LIFETIME_SECONDS {
            return Err(AssertionError::InvalidClaim { claim: "exp" });
        }

        // Bind the assertion to this request: a captured assertion cannot be
        // replayed on another path or with another method.
        if claims.htm != method.as_str() {
            return Err(AssertionError::WrongMethod {
                signed: claims.htm,
                received: method.as_str().to_owned(),
            });
        }
        if claims.htu != path_and_query {
            return Err(AssertionError::WrongPath {
                signed: claims.htu,
                received: path_and_query.to_owned(),
            });
        }

        // The plain headers are conveniences for logs and proxies; if one is
        // present it must say what the signature says, or someone edited it.
        for (header, claim) in [
            (TENANT_HEADER, &claims.tid),
            (USER_HEADER, &claims.sub),
            (ACTOR_TYPE_HEADER, &claims.act),
            (CORRELATION_HEADER, &claims.cid),
        ] {
            if headers
                .get_all(header)
                .iter()
                .any(|value| value.as_bytes() != claim.as_bytes())
            {
                return Err(AssertionError::HeaderMismatch { header });
            }
        }

        let jti = CorrelationId::parse(&claims.jti)
            .ok_or(AssertionError::InvalidClaim { claim: "jti" })?
            .as_uuid()
            .as_u128();
        let exp = claims.exp;
        let call = KernelCall::from_claims(claims, headers)?;
        // Last: only an assertion that passed every other check is remembered,
        // so refused ones cannot fill the cache.
        self.inner.seen.record(exp, jti, now_seconds, leeway)?;
        Ok(call)
    }

    /// Reads the JOSE header by hand and picks the key its `kid` names.
    fn key_for(&self, token: &str) -> Result<&VerifyingKey, AssertionError> {
        let header = jws::decode_header(token).map_err(AssertionError::from_jws)?;
        if header.alg != ASSERTION_ALGORITHM {
            return Err(AssertionError::AlgorithmNotAccepted(printable_prefix(
                &header.alg,
            )));
        }
        if header.crit.is_some() {
            // RFC 7515 §4.1.11: extensions we do not understand must be refused.
            return Err(AssertionError::Malformed("critical header extensions"));
        }
        let kid = header.kid.ok_or(AssertionError::MissingKid)?;
        self.inner
            .keys
            .get(&kid)
            .ok_or_else(|| AssertionError::UnknownKid(printable_prefix(&kid)))
    }
}

impl fmt::Debug for AssertionVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AssertionVerifier")
            .field("canon", &self.inner.canon)
            .field("issuer", &self.inner.issuer)
            .field("leeway_seconds", &self.inner.leeway_seconds)
            .field("kids", &self.inner.kids)
            .field("secrets", &"[REDACTED]")
            .finish()
    }
}

/// Splits `AIBOS_ASSERTION_SECRETS` into secrets.
fn split_secrets(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn validation(canon: &str, issuer: &str) -> Validation {
    let mut validation = Validation::new(issuer, canon);
    // `exp` (still required) and `iat` are checked in `verify_at`.
    validation.check_exp = false;
    validation.check_nbf = false;
    validation
}

fn unix_now_seconds() -> i64 {
    // A clock before 1970 makes every assertion "issued in the future": refused, not a panic.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The one `x-kernel-assertion` value, within bounds.
fn single_assertion(headers: &HeaderMap) -> Result<&str, AssertionError> {
    let mut values = headers.get_all(ASSERTION_HEADER).iter();
    let value = values.next().ok_or(AssertionError::Missing)?;
    if values.next().is_some() {
        return Err(AssertionError::Malformed("more than one assertion header"));
    }
    if value.len() > ASSERTION_BYTES_MAX {
        return Err(AssertionError::TooLarge { bytes: value.len() });
    }
    value
        .to_str()
        .map_err(|_| AssertionError::Malformed("assertion is not ASCII"))
}

/// Up to 32 printable ASCII characters of an attacker-supplied value, for logs.
fn printable_prefix(text: &str) -> String {
    text.chars()
        .filter(char::is_ascii_graphic)
        .take(2 * KID_LEN)
        .collect()
}

/// Why an assertion was refused. Precise, for the cell's logs; the caller only
/// ever sees a uniform 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssertionError {
    /// No `x-kernel-assertion` header: the call did not come through the kernel.
    #[error("no x-kernel-assertion header")]
    Missing,
    /// The header is larger than [`ASSERTION_BYTES_MAX`].
    #[error("x-kernel-assertion is {bytes} bytes, more than the {ASSERTION_BYTES_MAX} allowed")]
    TooLarge {
        /// Its size.
        bytes: usize,
    },
    /// The header is not a well-formed assertion.
    #[error("x-kernel-assertion is malformed: {0}")]
    Malformed(&'static str),
    /// The JOSE header names an algorithm other than HS256 (`none` included).
    #[error("algorithm {0:?} is not accepted; assertions are HS256")]
    AlgorithmNotAccepted(String),
    /// The JOSE header has no `kid`.
    #[error("the assertion header names no kid")]
    MissingKid,
    /// The `kid` names no configured secret: another canon's, a retired one, or
    /// a new one this cell has not been given yet.
    #[error("the assertion's kid {0:?} names no configured secret")]
    UnknownKid(String),
    /// The signature does not verify with the secret the `kid` names.
    #[error("the assertion's signature does not verify")]
    BadSignature,
    /// `iss` is not the expected issuer.
    #[error("the assertion was issued by someone else")]
    WrongIssuer,
    /// `aud` is not this canon: an assertion meant for another canon.
    #[error("the assertion is addressed to another canon")]
    WrongAudience,
    /// `exp` has passed, beyond the leeway.
    #[error("the assertion expired at {exp}, it is now {now}")]
    Expired {
        /// The signed expiry (seconds since the epoch).
        exp: i64,
        /// The cell's clock.
        now: i64,
    },
    /// `iat` is in the future, beyond the leeway: the clocks disagree badly.
    #[error("the assertion was issued at {iat}, after now ({now})")]
    IssuedInFuture {
        /// The signed issue time (seconds since the epoch).
        iat: i64,
        /// The cell's clock.
        now: i64,
    },
    /// `htm` is not the request's method: a replay with another method.
    #[error("the assertion was signed for method {signed}, the request is {received}")]
    WrongMethod {
        /// The method in `htm`.
        signed: String,
        /// The request's method.
        received: String,
    },
    /// `htu` is not the request's path and query: a replay on another path, or a
    /// proxy between the kernel and the cell that rewrites paths.
    #[error("the assertion was signed for {signed:?}, the request is for {received:?}")]
    WrongPath {
        /// The path and query in `htu`.
        signed: String,
        /// The request's path and query.
        received: String,
    },
    /// A plain identity header disagrees with the signed claims.
    #[error("header {header} disagrees with the signed assertion")]
    HeaderMismatch {
        /// The header's name.
        header: &'static str,
    },
    /// This assertion was accepted before: the same signed call sent again.
    /// Each call through the kernel carries a new one (its `jti`).
    #[error("the assertion was already used (a replayed call)")]
    Replayed,
    /// The replay cache is full of unexpired assertions: the cell takes more
    /// calls than it was sized for ([`REPLAY_CACHE_ENTRIES_MAX`]).
    #[error(
        "the replay cache is full ({entries} unexpired assertions); refused rather than forget one"
    )]
    ReplayCacheFull {
        /// How many it holds.
        entries: usize,
    },
    /// A signed claim has a value the kernel never sends.
    #[error("the assertion's {claim} claim is not valid")]
    InvalidClaim {
        /// The claim's name.
        claim: &'static str,
    },
}

impl AssertionError {
    fn from_jws(error: JwsError) -> AssertionError {
        match error {
            JwsError::Malformed(reason) => AssertionError::Malformed(reason),
            JwsError::AlgorithmNotAccepted(alg) => AssertionError::AlgorithmNotAccepted(alg),
            JwsError::CriticalHeader => AssertionError::Malformed("critical header extensions"),
            JwsError::BadSignature => AssertionError::BadSignature,
            JwsError::WrongAudience => AssertionError::WrongAudience,
            JwsError::WrongIssuer => AssertionError::WrongIssuer,
            JwsError::Expired { exp, now } => AssertionError::Expired { exp, now },
            JwsError::MissingClaim(_)
            | JwsError::InvalidClaim(_)
            | JwsError::NotYetValid { .. }
            | JwsError::Claims(_)
            | JwsError::InvalidKey => AssertionError::Malformed("claims are not assertion claims"),
        }
    }
}

/// Who the kernel says is calling: what a handler gets once the assertion verifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelCall {
    /// The caller's tenant (`tid`). Scope every read and write by it.
    pub tenant_id: String,
    /// The user or service-account id (`sub`).
    pub subject: String,
    /// Whether the subject is a user or a service account (`act`).
    pub actor_type: ActorType,
    /// The call's correlation id (`cid`): put it in logs and pass it on to the kernel.
    pub correlation_id: CorrelationId,
    /// The client address as the kernel saw it (`x-forwarded-for`; not signed).
    pub forwarded_for: Option<String>,
    /// The W3C `traceparent` the kernel forwarded, when it is well formed (not signed).
    pub traceparent: Option<String>,
    /// Every signed claim, as verified.
    pub claims: AssertionClaims,
}

impl KernelCall {
    fn from_claims(
        claims: AssertionClaims,
        headers: &HeaderMap,
    ) -> Result<KernelCall, AssertionError> {
        if claims.tid.is_empty() {
            return Err(AssertionError::InvalidClaim { claim: "tid" });
        }
        if claims.sub.is_empty() {
            return Err(AssertionError::InvalidClaim { claim: "sub" });
        }
        let actor_type =
            ActorType::parse(&claims.act).ok_or(AssertionError::InvalidClaim { claim: "act" })?;
        let correlation_id = CorrelationId::parse(&claims.cid)
            .ok_or(AssertionError::InvalidClaim { claim: "cid" })?;
        let header_text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Ok(KernelCall {
            tenant_id: claims.tid.clone(),
            subject: claims.sub.clone(),
            actor_type,
            correlation_id,
            forwarded_for: header_text(FORWARDED_FOR_HEADER),
            traceparent: header_text(TRACEPARENT_HEADER)
                .filter(|text| TraceParent::parse(text).is_some()),
            claims,
        })
    }
}

/// The kind of subject behind a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActorType {
    /// A person, signed in to the kernel.
    User,
    /// A service account (another cell, a batch job).
    Service,
}

impl ActorType {
    /// Parses the wire form (`user` or `service`).
    pub fn parse(text: &str) -> Option<ActorType> {
        match text {
            "user" => Some(ActorType::User),
            "service" => Some(ActorType::Service),
            _ => None,
        }
    }

    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            ActorType::User => "user",
            ActorType::Service => "service",
        }
    }
}

impl fmt::Display for ActorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use aibos_wire::jws::SigningKey;
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use http::HeaderValue;

    pub(crate) const CANON: &str = "payments";
    pub(crate) const SECRET_A: &str = "kas_0123456789abcdef_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789";
    pub(crate) const SECRET_B: &str = "kas_fedcba9876543210_ZyXwVuTsRqPoNmLkJiHgFeDcBa9876543210";
    /// Another canon's secret (its own kid).
    const OTHER_CANON_SECRET: &str = "kas_00000000000000aa_OtherCanonSecretOtherCanonSecret0000";
    /// Our kid, but not our secret: a forger who knows the kid.
    const FORGED_SECRET: &str = "kas_0123456789abcdef_ForgedForgedForgedForgedForgedForged00";
    const NOW: i64 = 1_750_000_000;
    const TENANT: &str = "0197a1b2-0000-7000-8000-000000000001";
    const USER: &str = "0197a1b2-0000-7000-8000-000000000002";
    const CID: &str = "0197a1b2-0000-7000-8000-0000000000c1";
    const PATH: &str = "/payments/42?expand=ledger";

    pub(crate) fn claims_for(method: &str, path: &str, iat: i64) -> AssertionClaims {
        AssertionClaims {
            iss: DEFAULT_ISSUER.into(),
            aud: CANON.into(),
            tid: TENANT.into(),
            sub: USER.into(),
            act: "user".into(),
            cid: CID.into(),
            htm: method.into(),
            htu: path.into(),
            iat,
            exp: iat + ASSERTION_LIFETIME_SECONDS,
            jti: "0197a1b2-0000-7000-8000-0000000000f1".into(),
        }
    }

    pub(crate) fn sign(claims: &AssertionClaims, secret: &str) -> String {
        jws::sign(
            claims,
            &SigningKey::hs256(secret.as_bytes()),
            secret_kid(secret),
        )
        .expect("assertion claims serialise")
    }

    /// A token whose JOSE header is `header` (JSON, sent as is), HMAC-SHA256
    /// signed with `secret` whatever the header says.
    fn sign_with_header(header: &str, claims: &AssertionClaims, secret: &str) -> String {
        let input = format!(
            "{}.{}",
            b64(header.as_bytes()),
            b64(&serde_json::to_vec(claims).expect("json"))
        );
        let signature = SigningKey::hs256(secret.as_bytes()).signature(input.as_bytes());
        format!("{input}.{}", b64(&signature))
    }

    /// The headers the gateway would send with `token`.
    pub(crate) fn gateway_headers(claims: &AssertionClaims, token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let mut set = |name: &'static str, value: &str| {
            headers.insert(name, HeaderValue::from_str(value).expect("test header"));
        };
        set(ASSERTION_HEADER, token);
        set(TENANT_HEADER, &claims.tid);
        set(USER_HEADER, &claims.sub);
        set(ACTOR_TYPE_HEADER, &claims.act);
        set(CORRELATION_HEADER, &claims.cid);
        set(FORWARDED_FOR_HEADER, "203.0.113.7");
        set(
            TRACEPARENT_HEADER,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        headers
    }

    fn verifier() -> AssertionVerifier {
        AssertionVerifier::new(CANON, [SECRET_A.to_owned()]).expect("valid configuration")
    }

    /// Verifies a GET of `PATH` at `NOW` carrying `token` and the matching plain headers.
    fn check(claims: &AssertionClaims, token: &str) -> Result<KernelCall, AssertionError> {
        verifier().verify_at(&Method::GET, PATH, &gateway_headers(claims, token), NOW)
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    #[test]
    fn a_good_assertion_yields_the_signed_caller() {
        let claims = claims_for("GET", PATH, NOW);
        let call = check(&claims, &sign(&claims, SECRET_A)).expect("verifies");
        assert_eq!(call.tenant_id, TENANT);
        assert_eq!(call.subject, USER);
        assert_eq!(call.actor_type, ActorType::User);
        assert_eq!(call.correlation_id.to_string(), CID);
        assert_eq!(call.forwarded_for.as_deref(), Some("203.0.113.7"));
        assert_eq!(
            call.traceparent.as_deref(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert_eq!(call.claims, claims);
    }

    #[test]
    fn a_service_account_call_is_marked_as_such() {
        let mut claims = claims_for("GET", PATH, NOW);
        claims.act = "service".into();
        let call = check(&claims, &sign(&claims, SECRET_A)).expect("verifies");
        assert_eq!(call.actor_type, ActorType::Service);
    }

    #[test]
    fn a_path_without_query_is_signed_as_the_bare_path() {
        let claims = claims_for("POST", "/payments/process", NOW);
        let headers = gateway_headers(&claims, &sign(&claims, SECRET_A));
        let call = verifier().verify_at(&Method::POST, "/payments/process", &headers, NOW);
        assert_eq!(
            call.map(|c| c.claims.htu),
            Ok("/payments/process".to_owned())
        );
        // The same token with a query the kernel did not sign is refused.
        let with_query =
            verifier().verify_at(&Method::POST, "/payments/process?x=1", &headers, NOW);
        assert!(matches!(with_query, Err(AssertionError::WrongPath { .. })));
    }

    #[test]
    fn a_tampered_payload_with_the_original_signature_is_refused() {
        let claims = claims_for("GET", PATH, NOW);
        let token = sign(&claims, SECRET_A);
        let parts: Vec<&str> = token.split('.').collect();
        let mut tampered = claims.clone();
        tampered.tid = "0197a1b2-0000-7000-8000-0000000000ff".into();
        let payload = b64(&serde_json::to_vec(&tampered).expect("json"));
        let forged = format!("{}.{payload}.{}", parts[0], parts[2]);
        assert_eq!(check(&tampered, &forged), Err(AssertionError::BadSignature));
    }

    #[test]
    fn an_expired_assertion_is_refused_after_the_leeway() {
        let claims = claims_for("GET", PATH, NOW - ASSERTION_LIFETIME_SECONDS - 6);
        assert_eq!(
            check(&claims, &sign(&claims, SECRET_A)),
            Err(AssertionError::Expired {
                exp: NOW - 6,
                now: NOW
            })
        );
        // Within the leeway it still verifies: the edge is where the docs say.
        let claims = claims_for("GET", PATH, NOW - ASSERTION_LIFETIME_SECONDS - 5);
        assert!(check(&claims, &sign(&claims, SECRET_A)).is_ok());
    }

    #[test]
    fn an_assertion_issued_in_the_future_is_refused_after_the_leeway() {
        let claims = claims_for("GET", PATH, NOW + 6);
        assert_eq!(
            check(&claims, &sign(&claims, SECRET_A)),
            Err(AssertionError::IssuedInFuture {
                iat: NOW + 6,
                now: NOW
            })
        );
        let claims = claims_for("GET", PATH, NOW + 5);
        assert!(check(&claims, &sign(&claims, SECRET_A)).is_ok());
    }

    #[test]
    fn the_leeway_is_configurable_and_bounded() {
        let strict = verifier().with_leeway_seconds(0).expect("in bounds");
        let claims = claims_for("GET", PATH, NOW + 1);
        let headers = gateway_headers(&claims, &sign(&claims, SECRET_A));
        assert!(matches!(
            strict.verify_at(&Method::GET, PATH, &headers, NOW),
            Err(AssertionError::IssuedInFuture { .. })
        ));
        assert_eq!(
            verifier().with_leeway_seconds(61).map(|_| ()),
            Err(ConfigError::LeewayTooLarge {
                given_seconds: 61,
                max_seconds: 60
            })
        );
    }

    #[test]
    fn an_assertion_for_another_canon_is_refused() {
        let mut claims = claims_for("GET", PATH, NOW);
        claims.aud = "ledger".into();
        assert_eq!(
            check(&claims, &sign(&claims, SECRET_A)),
            Err(AssertionError::WrongAudience)
        );
    }

    #[test]
    fn an_assertion_from_another_issuer_is_refused() {
        let mut claims = claims_for("GET", PATH, NOW);
        claims.iss = "someone-else".into();
        assert_eq!(
            check(&claims, &sign(&claims, SECRET_A)),
            Err(AssertionError::WrongIssuer)
        );
        let custom = verifier()
            .with_issuer("someone-else")
            .expect("valid issuer");
        let headers = gateway_headers(&claims, &sign(&claims, SECRET_A));
        assert!(custom.verify_at(&Method::GET, PATH, &headers, NOW).is_ok());
    }

    #[test]
    fn an_assertion_signed_with_another_canons_secret_is_refused() {
        let claims = claims_for("GET", PATH, NOW);
        assert_eq!(
            check(&claims, &sign(&claims, OTHER_CANON_SECRET)),
            Err(AssertionError::UnknownKid("00000000000000aa".into()))
        );
    }

    #[test]
    fn an_assertion_naming_our_kid_but_signed_with_another_secret_is_refused() {
        let claims = claims_for("GET", PATH, NOW);
        assert_eq!(
            check(&claims, &sign(&claims, FORGED_SECRET)),
            Err(AssertionError::BadSignature)
        );
    }

    #[test]
    fn an_assertion_replayed_on_another_path_is_refused() {
        let claims = claims_for("GET", PATH, NOW);
        let headers = gateway_headers(&claims, &sign(&claims, SECRET_A));
        assert_eq!(
            verifier().verify_at(&Method::GET, "/payments/43?expand=ledger", &headers, NOW),
            Err(AssertionError::WrongPath {
                signed: PATH.into(),
                received: "/payments/43?expand=ledger".into()
            })
        );
    }

    #[test]
    fn an_assertion_replayed_with_another_method_is_refused() {
        let claims = claims_for("GET", PATH, NOW);
        let headers = gateway_headers(&claims, &sign(&claims, SECRET_A));
        assert_eq!(
            verifier().verify_at(&Method::DELETE, PATH, &headers, NOW),
            Err(AssertionError::WrongMethod {
                signed: "GET".into(),
                received: "DELETE".into()
            })
        );
    }

    #[test]
    fn an_unknown_or_missing_kid_is_refused() {
        let claims = claims_for("GET", PATH, NOW);
        let key = SigningKey::hs256(SECRET_A.as_bytes());
        let token = jws::sign(&claims, &key, Some("aaaaaaaaaaaaaaaa")).expect("sign");
        assert_eq!(
            check(&claims, &token),
            Err(AssertionError::UnknownKid("aaaaaaaaaaaaaaaa".into()))
        );
        let token = jws::sign(&claims, &key, None).expect("sign");
        assert_eq!(check(&claims, &token), Err(AssertionError::MissingKid));
    }

    #[test]
    fn alg_none_and_other_algorithms_are_refused() {
        let claims = claims_for("GET", PATH, NOW);
        let payload = b64(&serde_json::to_vec(&claims).expect("json"));
        let none_header = b64(br#"{"alg":"none","typ":"JWT","kid":"0123456789abcdef"}"#);
        assert_eq!(
            check(&claims, &format!("{none_header}.{payload}.")),
            Err(AssertionError::AlgorithmNotAccepted("none".into()))
        );
        // Another HMAC algorithm with the right secret is still not the pinned
        // one: refused by name, before any signature is computed.
        let hs512 = sign_with_header(
            r#"{"alg":"HS512","typ":"JWT","kid":"0123456789abcdef"}"#,
            &claims,
            SECRET_A,
        );
        assert_eq!(
            check(&claims, &hs512),
            Err(AssertionError::AlgorithmNotAccepted("HS512".into()))
        );
    }

    #[test]
    fn critical_header_extensions_are_refused() {
        let claims = claims_for("GET", PATH, NOW);
        let token = sign_with_header(
            r#"{"alg":"HS256","typ":"JWT","kid":"0123456789abcdef","crit":["exp"]}"#,
            &claims,
            SECRET_A,
        );
        assert_eq!(
            check(&claims, &token),
            Err(AssertionError::Malformed("critical header extensions"))
        );
    }

    #[test]
    fn a_missing_duplicated_or_garbled_header_is_refused() {
        let claims = claims_for("GET", PATH, NOW);
        let mut headers = gateway_headers(&claims, "x");
        headers.remove(ASSERTION_HEADER);
        assert_eq!(
            verifier().verify_at(&Method::GET, PATH, &headers, NOW),
            Err(AssertionError::Missing)
        );

        let token = sign(&claims, SECRET_A);
        let mut headers = gateway_headers(&claims, &token);
        headers.append(
            ASSERTION_HEADER,
            HeaderValue::from_str(&token).expect("header"),
        );
        assert_eq!(
            verifier().verify_at(&Method::GET, PATH, &headers, NOW),
            Err(AssertionError::Malformed("more than one assertion header"))
        );

        for garbled in ["", "a.b", "a.b.c.d", "!!!.e30.", "e30.e30.sig"] {
            assert!(
                matches!(check(&claims, garbled), Err(AssertionError::Malformed(_))),
                "{garbled:?} should be malformed"
            );
        }

        let huge = "a".repeat(ASSERTION_BYTES_MAX + 1);
        assert_eq!(
            check(&claims, &huge),
            Err(AssertionError::TooLarge {
                bytes: ASSERTION_BYTES_MAX + 1
            })
        );
    }

    #[test]
    fn a_plain_header_that_disagrees_with_the_claims_is_refused() {
        let claims = claims_for("GET", PATH, NOW);
        let token = sign(&claims, SECRET_A);
        for header in [
            TENANT_HEADER,
            USER_HEADER,
            ACTOR_TYPE_HEADER,
            CORRELATION_HEADER,
        ] {
            let mut headers = gateway_headers(&claims, &token);
            headers.insert(
                header,
                HeaderValue::from_static("0197a1b2-0000-7000-8000-0000000000ff"),
            );
            assert_eq!(
                verifier().verify_at(&Method::GET, PATH, &headers, NOW),
                Err(AssertionError::HeaderMismatch { header }),
                "{header}"
            );
        }
        // A second, different copy beside the right one is refused too.
        let mut headers = gateway_headers(&claims, &token);
        headers.append(TENANT_HEADER, HeaderValue::from_static("someone-else"));
        assert_eq!(
            verifier().verify_at(&Method::GET, PATH, &headers, NOW),
            Err(AssertionError::HeaderMismatch {
                header: TENANT_HEADER
            })
        );
    }

    #[test]
    fn absent_plain_headers_are_fine_because_the_claims_are_signed() {
        let claims = claims_for("GET", PATH, NOW);
        let mut headers = HeaderMap::new();
        headers.insert(
            ASSERTION_HEADER,
            HeaderValue::from_str(&sign(&claims, SECRET_A)).expect("header"),
        );
        let call = verifier()
            .verify_at(&Method::GET, PATH, &headers, NOW)
            .expect("verifies");
        assert_eq!(call.tenant_id, TENANT);
        assert_eq!(call.forwarded_for, None);
        assert_eq!(call.traceparent, None);
    }

    #[test]
    fn signed_claims_the_kernel_never_sends_are_refused() {
        let check_claim = |edit: fn(&mut AssertionClaims), claim: &'static str| {
            let mut claims = claims_for("GET", PATH, NOW);
            edit(&mut claims);
            assert_eq!(
                check(&claims, &sign(&claims, SECRET_A)),
                Err(AssertionError::InvalidClaim { claim })
            );
        };
        check_claim(|c| c.act = "robot".into(), "act");
        check_claim(|c| c.cid = "not-a-uuid".into(), "cid");
        check_claim(|c| c.tid = String::new(), "tid");
        check_claim(|c| c.sub = String::new(), "sub");
    }

    #[test]
    fn during_a_rotation_tokens_of_either_secret_verify() {
        let verifier = AssertionVerifier::new(CANON, [SECRET_A.to_owned(), SECRET_B.to_owned()])
            .expect("valid configuration");
        assert_eq!(verifier.kids(), ["0123456789abcdef", "fedcba9876543210"]);
        let claims = claims_for("GET", PATH, NOW);
        for (n, secret) in [SECRET_A, SECRET_B].into_iter().enumerate() {
            // Each call the kernel signs has its own jti.
            let claims = claims_with_jti(NOW, n as u8);
            let headers = gateway_headers(&claims, &sign(&claims, secret));
            let call = verifier.verify_at(&Method::GET, PATH, &headers, NOW);
            assert_eq!(call.map(|c| c.tenant_id), Ok(TENANT.to_owned()), "{secret}");
        }
        // Once the old secret is dropped, its tokens stop verifying.
        let after = AssertionVerifier::new(CANON, [SECRET_B.to_owned()]).expect("valid");
        let headers = gateway_headers(&claims, &sign(&claims, SECRET_A));
        assert_eq!(
            after.verify_at(&Method::GET, PATH, &headers, NOW),
            Err(AssertionError::UnknownKid("0123456789abcdef".into()))
        );
    }

    #[test]
    fn bad_configurations_are_refused_without_quoting_secrets() {
        let new = |secrets: &[&str]| {
            AssertionVerifier::new(CANON, secrets.iter().map(|s| (*s).to_owned())).map(|_| ())
        };
        assert_eq!(new(&[]), Err(ConfigError::NoSecrets));
        let err = new(&[SECRET_A, "kas_nothex_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"]);
        assert_eq!(err, Err(ConfigError::InvalidSecret { position: 2 }));
        assert_eq!(
            new(&[SECRET_A, FORGED_SECRET]),
            Err(ConfigError::DuplicateKid {
                kid: "0123456789abcdef".into()
            })
        );
        assert_eq!(
            new(&[SECRET_A, SECRET_A]),
            Ok(()),
            "a repeated secret is harmless"
        );
        assert_eq!(
            new(&[SECRET_A; SECRETS_MAX + 1]),
            Err(ConfigError::TooManySecrets {
                given: SECRETS_MAX + 1,
                max: SECRETS_MAX
            })
        );
        assert_eq!(
            AssertionVerifier::new("", [SECRET_A.to_owned()]).map(|_| ()),
            Err(ConfigError::InvalidCanonName)
        );
        let message = ConfigError::InvalidSecret { position: 1 }.to_string();
        assert!(!message.contains("AbCdEf"), "{message}");
    }

    #[test]
    fn the_secret_list_from_the_environment_is_split_on_commas() {
        assert_eq!(
            split_secrets(&format!(" {SECRET_A} ,{SECRET_B},, ")),
            [SECRET_A, SECRET_B]
        );
        assert!(split_secrets(" , ").is_empty());
    }

    #[test]
    fn debug_output_shows_kids_but_never_secrets() {
        let verifier = AssertionVerifier::new(CANON, [SECRET_A.to_owned(), SECRET_B.to_owned()])
            .expect("valid");
        let debug = format!("{verifier:?}");
        assert!(debug.contains("0123456789abcdef"), "{debug}");
        assert!(debug.contains("payments"), "{debug}");
        for secret in [SECRET_A, SECRET_B] {
            let random = secret.rsplit('_').next().expect("random part");
            assert!(!debug.contains(random), "{debug}");
        }
    }

    /// `claims_for` with its own `jti`.
    fn claims_with_jti(iat: i64, n: u8) -> AssertionClaims {
        let mut claims = claims_for("GET", PATH, iat);
        claims.jti = format!("0197a1b2-0000-7000-8000-0000000001{n:02x}");
        claims
    }

    fn verify_with(
        verifier: &AssertionVerifier,
        claims: &AssertionClaims,
        now: i64,
    ) -> Result<KernelCall, AssertionError> {
        let headers = gateway_headers(claims, &sign(claims, SECRET_A));
        verifier.verify_at(&Method::GET, PATH, &headers, now)
    }

    #[test]
    fn an_assertion_is_accepted_once_by_a_verifier_and_its_clones() {
        let verifier = verifier();
        let claims = claims_with_jti(NOW, 1);
        verify_with(&verifier, &claims, NOW).expect("first use");
        assert_eq!(
            verify_with(&verifier, &claims, NOW + 1),
            Err(AssertionError::Replayed)
        );
        let clone = verifier.clone();
        assert_eq!(
            verify_with(&clone, &claims, NOW + 2),
            Err(AssertionError::Replayed),
            "clones (axum state) share the cache"
        );
        verify_with(&verifier, &claims_with_jti(NOW, 2), NOW).expect("another call");
    }

    #[test]
    fn a_refused_assertion_is_not_remembered() {
        let verifier = verifier();
        let claims = claims_with_jti(NOW, 3);
        let headers = gateway_headers(&claims, &sign(&claims, SECRET_A));
        assert!(matches!(
            verifier.verify_at(&Method::GET, "/payments/43", &headers, NOW),
            Err(AssertionError::WrongPath { .. })
        ));
        verifier
            .verify_at(&Method::GET, PATH, &headers, NOW)
            .expect("its own request is still accepted");
    }

    #[test]
    fn a_full_cache_drops_expired_entries_and_otherwise_refuses() {
        let verifier = verifier().with_replay_cache_entries(2).expect("valid size");
        verify_with(&verifier, &claims_with_jti(NOW, 1), NOW).expect("1");
        verify_with(&verifier, &claims_with_jti(NOW + 10, 2), NOW + 10).expect("2");
        assert_eq!(
            verify_with(&verifier, &claims_with_jti(NOW + 10, 3), NOW + 10),
            Err(AssertionError::ReplayCacheFull { entries: 2 }),
            "refused rather than forgetting an unexpired one"
        );
        // Once the first has expired (exp + leeway passed), its place is free,
        // and it is refused as expired, not as unknown.
        let later = NOW + ASSERTION_LIFETIME_SECONDS + DEFAULT_LEEWAY_SECONDS as i64 + 1;
        verify_with(&verifier, &claims_with_jti(later, 4), later).expect("room again");
        assert!(matches!(
            verify_with(&verifier, &claims_with_jti(NOW, 1), later),
            Err(AssertionError::Expired { .. })
        ));
        assert_eq!(
            verify_with(&verifier, &claims_with_jti(NOW + 10, 2), later),
            Err(AssertionError::Replayed),
            "the unexpired one is still remembered"
        );
        for size in [0, REPLAY_CACHE_ENTRIES_MAX + 1] {
            assert!(matches!(
                verifier.clone().with_replay_cache_entries(size),
                Err(ConfigError::ReplayCacheSize { .. })
            ));
        }
    }

    #[test]
    fn a_jti_that_is_no_uuid_or_a_lifetime_too_long_is_refused() {
        let mut claims = claims_with_jti(NOW, 5);
        claims.jti = "not-a-uuid".into();
        assert_eq!(
            check(&claims, &sign(&claims, SECRET_A)),
            Err(AssertionError::InvalidClaim { claim: "jti" })
        );
        let mut claims = claims_with_jti(NOW, 6);
        claims.exp = NOW + ASSERTION_LIFETIME_SECONDS + 1;
        assert_eq!(
            check(&claims, &sign(&claims, SECRET_A)),
            Err(AssertionError::InvalidClaim { claim: "exp" })
        );
    }
}
