//! The principal cache: who a session is and what it may do, without a database
//! round trip per request.
//!
//! Entries are keyed by session id and built from the database on a miss.
//! Every change that could alter an entry (logout, suspension, role or
//! assignment change, delegation, break-glass) invalidates the affected entries
//! after its transaction commits; on PostgreSQL the same transaction also sends
//! `NOTIFY aibos_authz`, which every other kernel instance's listener turns into
//! the same invalidation. A generation counter closes the race between a miss
//! that is loading old data and an invalidation that lands meanwhile.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::http::HeaderValue;
use quick_cache::sync::Cache;
use time::OffsetDateTime;

use super::PermissionSet;
use crate::identity::tokens::Claims;
use crate::limits;

/// The LISTEN/NOTIFY channel of invalidations.
pub const NOTIFY_CHANNEL: &str = "aibos_authz";

/// An authenticated session with everything a permission check needs.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The tenant (from the token's `tid`, confirmed against the session).
    pub tenant_id: String,
    /// The tenant's slug.
    pub tenant_slug: String,
    /// Whether the tenant is suspended (its tokens get 403 `TENANT_SUSPENDED`).
    pub tenant_suspended: bool,
    /// The user or service account.
    pub subject_id: String,
    /// `user` or `service`.
    pub actor_type: &'static str,
    /// The session.
    pub session_id: String,
    /// The user's email (users only).
    pub email: Option<String>,
    /// The user's or service account's name.
    pub name: String,
    /// Everything the caller may do now: roles, delegations received, break-glass.
    pub permissions: PermissionSet,
    /// What the caller holds through its own roles, never through a delegation
    /// or break-glass: all it may give (roles, assignments, delegations).
    pub grantable: PermissionSet,
    /// When the earliest time-bound grant (or the session) ends; the entry is rebuilt then.
    pub valid_until: Option<OffsetDateTime>,
    /// `tenant_id` and `subject_id` as header values, for the identity the
    /// gateway forwards with every call: made once per session, not per call.
    pub id_headers: IdHeaders,
}

/// A principal's ids as header values (`x-tenant-id`, `x-user-sub`).
#[derive(Debug, Clone)]
pub struct IdHeaders {
    /// The tenant id.
    pub tenant: HeaderValue,
    /// The user or service account id.
    pub subject: HeaderValue,
}

impl IdHeaders {
    /// `None` for an id that is not valid header text (ids are UUIDs, so never).
    pub fn new(tenant_id: &str, subject_id: &str) -> Option<IdHeaders> {
        Some(IdHeaders {
            tenant: HeaderValue::from_str(tenant_id).ok()?,
            subject: HeaderValue::from_str(subject_id).ok()?,
        })
    }
}

impl Principal {
    /// Whether its time-bound grants (and session) still hold at `now`.
    pub fn holds_at(&self, now: OffsetDateTime) -> bool {
        self.valid_until.is_none_or(|until| until > now)
    }
}

/// The last Unix second a verified token is accepted: its `exp` plus the
/// verification leeway, as the signature check itself allows.
fn usable_until(claims: &Claims) -> i64 {
    claims.exp + i64::try_from(crate::identity::tokens::LEEWAY_SECONDS).unwrap_or(0)
}

/// Invalidation targets, as sent over NOTIFY (`tenant:<id>`, `session:<id>`, `all`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// Every entry of a tenant (role, assignment, user or tenant change).
    Tenant(String),
    /// One session (logout, refresh-token reuse).
    Session(String),
    /// Everything (key rotation, a lost listener connection).
    All,
    /// The service registry changed: rebuild the gateway's route table.
    Registry,
}

impl Invalidation {
    /// The NOTIFY payload.
    pub fn payload(&self) -> String {
        match self {
            Invalidation::Tenant(id) => format!("tenant:{id}"),
            Invalidation::Session(id) => format!("session:{id}"),
            Invalidation::All => "all".to_owned(),
            Invalidation::Registry => "registry".to_owned(),
        }
    }

    /// Parses a NOTIFY payload; unknown payloads invalidate everything (safe side).
    pub fn parse(payload: &str) -> Invalidation {
        match payload.split_once(':') {
            Some(("tenant", id)) => Invalidation::Tenant(id.to_owned()),
            Some(("session", id)) => Invalidation::Session(id.to_owned()),
            None if payload == "registry" => Invalidation::Registry,
            _ => Invalidation::All,
        }
    }
}

/// The caches of one kernel.
pub struct AuthCache {
    principals: Cache<String, Arc<Principal>>,
    /// Access tokens whose signature already verified, with their claims: a
    /// repeated token skips the Ed25519 check. Keyed by the whole token text.
    verified: Cache<String, Arc<Claims>>,
    generation: AtomicU64,
    /// Makes "still at the generation it was loaded at? then store it" one
    /// step against an invalidation's "remove, then move the generation":
    /// without it a principal loaded before a change could pass the check, the
    /// invalidation run, and the stale principal land after it. Taken only on a
    /// miss and by invalidations, never on a cache hit.
    store_or_invalidate: Mutex<()>,
}

impl Default for AuthCache {
    fn default() -> AuthCache {
        AuthCache {
            principals: Cache::new(limits::PRINCIPAL_CACHE_ENTRIES_MAX),
            verified: Cache::new(limits::VERIFIED_TOKEN_CACHE_ENTRIES_MAX),
            generation: AtomicU64::new(0),
            store_or_invalidate: Mutex::new(()),
        }
    }
}

impl AuthCache {
    /// A cached principal still within its validity.
    pub fn principal(&self, session_id: &str, now: OffsetDateTime) -> Option<Arc<Principal>> {
        self.principals.get(session_id).filter(|p| p.holds_at(now))
    }

    /// The generation to pass to [`AuthCache::store_principal`] after loading.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Stores a principal loaded at `generation`, unless an invalidation happened since.
    pub fn store_principal(&self, generation: u64, principal: Arc<Principal>) {
        let _step = self
            .store_or_invalidate
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.generation.load(Ordering::Acquire) == generation {
            self.principals
                .insert(principal.session_id.clone(), principal);
        }
    }

    /// Claims of a token verified before, if still unexpired.
    pub fn verified_claims(&self, token: &str, now_unix: i64) -> Option<Arc<Claims>> {
        self.verified
            .get(token)
            .filter(|c| usable_until(c) > now_unix)
    }

    /// Remembers a verified token.
    pub fn store_verified(&self, token: &str, claims: Arc<Claims>) {
        self.verified.insert(token.to_owned(), claims);
    }

    /// Applies an invalidation (which also voids every [`LoopAuthCache`] entry
    /// filled before it).
    pub fn invalidate(&self, what: &Invalidation) {
        // Stale entries go first, the generation moves after: a request that
        // reads the new generation can then no longer find a stale principal
        // here to copy into its loop's front cache at that generation (the
        // other order left a window in which a revoked principal was refilled
        // into a front cache as current, until the next invalidation).
        let _step = self
            .store_or_invalidate
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match what {
            Invalidation::Tenant(tenant) => self.principals.retain(|_, p| &p.tenant_id != tenant),
            Invalidation::Session(session) => {
                self.principals.remove(session);
            }
            Invalidation::All => {
                self.principals.clear();
                self.verified.clear();
            }
            // Nothing cached here depends on canons or routes.
            Invalidation::Registry => {}
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// One event loop's front cache of resolved tokens: the whole token text to its
/// principal, owned by that loop alone (its lock is never contended), so a
/// repeated token touches none of the shared caches' locks.
///
/// It holds nothing the shared caches do not decide: an entry is used only while
/// no invalidation of any kind happened since it was filled (the shared
/// generation, one atomic load), while its token is unexpired and while the
/// principal's time-bound grants last. Logout, role changes, suspension and key
/// rotation all bump the generation, so they take effect on the next request
/// exactly as without this cache.
pub struct LoopAuthCache {
    /// Keyed by the token's bytes: a hit needs no check that they are text.
    entries: Mutex<quick_cache::unsync::Cache<Box<[u8]>, FrontEntry>>,
}

#[derive(Clone)]
struct FrontEntry {
    principal: Arc<Principal>,
    /// The token's `exp` plus the verification leeway, in Unix seconds.
    usable_until: i64,
    generation: u64,
}

impl Default for LoopAuthCache {
    fn default() -> LoopAuthCache {
        LoopAuthCache {
            entries: Mutex::new(quick_cache::unsync::Cache::new(
                limits::LOOP_AUTH_CACHE_ENTRIES_MAX,
            )),
        }
    }
}

impl LoopAuthCache {
    /// The principal of `token`, if cached at `generation` and still valid at `now`.
    pub fn get(
        &self,
        token: &[u8],
        now: OffsetDateTime,
        generation: u64,
    ) -> Option<Arc<Principal>> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = entries.get(token)?;
        let valid = entry.generation == generation
            && entry.usable_until > now.unix_timestamp()
            && entry.principal.holds_at(now);
        valid.then(|| entry.principal.clone())
    }

    /// Remembers `token`'s principal, resolved from the shared caches or the
    /// database after [`AuthCache::generation`] returned `generation`.
    pub fn insert(
        &self,
        token: &[u8],
        claims: &Claims,
        principal: Arc<Principal>,
        generation: u64,
    ) {
        let entry = FrontEntry {
            principal,
            usable_until: usable_until(claims),
            generation,
        };
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(token.into(), entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration;

    fn principal(session: &str, valid_until: Option<OffsetDateTime>) -> Arc<Principal> {
        Arc::new(Principal {
            tenant_id: "t1".into(),
            tenant_slug: "acme".into(),
            tenant_suspended: false,
            subject_id: "u1".into(),
            actor_type: "user",
            session_id: session.into(),
            email: None,
            name: "Ada".into(),
            permissions: PermissionSet::default(),
            grantable: PermissionSet::default(),
            valid_until,
            id_headers: IdHeaders::new("t1", "u1").unwrap(),
        })
    }

    fn claims(exp: i64) -> Claims {
        Claims {
            iss: "i".into(),
            aud: "a".into(),
            sub: "u1".into(),
            tid: "t1".into(),
            sid: "s1".into(),
            act: "user".into(),
            iat: exp - 900,
            nbf: exp - 900,
            exp,
            jti: "j".into(),
        }
    }

    #[test]
    fn a_front_entry_holds_only_at_its_generation() {
        let now = OffsetDateTime::now_utc();
        let shared = AuthCache::default();
        let front = LoopAuthCache::default();
        let generation = shared.generation();
        let exp = now.unix_timestamp() + 600;
        front.insert(b"tok", &claims(exp), principal("s1", None), generation);
        assert!(front.get(b"tok", now, shared.generation()).is_some());
        assert!(front.get(b"other", now, shared.generation()).is_none());

        // Any invalidation, even of another session, voids what was filled before it.
        shared.invalidate(&Invalidation::Session("s2".into()));
        assert!(front.get(b"tok", now, shared.generation()).is_none());
        shared.invalidate(&Invalidation::Registry);
        front.insert(b"tok", &claims(exp), principal("s1", None), generation);
        assert!(
            front.get(b"tok", now, shared.generation()).is_none(),
            "an entry resolved before an invalidation never becomes valid"
        );
    }

    #[test]
    fn a_front_entry_ends_with_its_token_and_its_grants() {
        let now = OffsetDateTime::now_utc();
        let front = LoopAuthCache::default();
        let leeway = i64::try_from(crate::identity::tokens::LEEWAY_SECONDS).unwrap_or(0);
        let exp = now.unix_timestamp() + 60;
        front.insert(b"tok", &claims(exp), principal("s1", None), 7);
        assert!(front.get(b"tok", now, 7).is_some());
        let after_expiry = now + Duration::seconds(60 + leeway);
        assert!(
            front.get(b"tok", after_expiry, 7).is_none(),
            "expired token"
        );

        let grant_ends = now + Duration::seconds(30);
        front.insert(b"tok", &claims(exp), principal("s1", Some(grant_ends)), 7);
        assert!(front.get(b"tok", now, 7).is_some());
        assert!(
            front.get(b"tok", grant_ends, 7).is_none(),
            "a time-bound grant ended: rebuilt from the shared cache"
        );
    }

    /// The request path of `AppState::authenticate` over both caches, with a
    /// "database" that is a version number: the principal's name.
    fn resolve(
        shared: &AuthCache,
        front: &LoopAuthCache,
        db: &std::sync::atomic::AtomicU64,
        exp: i64,
        now: OffsetDateTime,
    ) -> u64 {
        let generation = shared.generation();
        if let Some(p) = front.get(b"tok", now, generation) {
            return p.name.parse().unwrap();
        }
        let p = match shared.principal("s1", now) {
            Some(p) => p,
            None => {
                let mut loaded = (*principal("s1", None)).clone();
                loaded.name = db.load(Ordering::Acquire).to_string();
                let loaded = Arc::new(loaded);
                shared.store_principal(generation, loaded.clone());
                loaded
            }
        };
        front.insert(b"tok", &claims(exp), p.clone(), generation);
        p.name.parse().unwrap()
    }

    #[test]
    fn no_request_after_an_invalidation_sees_what_it_revoked() {
        use std::sync::atomic::AtomicBool;
        let now = OffsetDateTime::now_utc();
        let exp = now.unix_timestamp() + 600;
        let shared = Arc::new(AuthCache::default());
        let db = Arc::new(AtomicU64::new(0));
        // The newest version whose invalidation has returned: any request that
        // starts after must see it or a newer one.
        let invalidated = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (shared, db, invalidated, stop) = (
                    shared.clone(),
                    db.clone(),
                    invalidated.clone(),
                    stop.clone(),
                );
                std::thread::spawn(move || {
                    let front = LoopAuthCache::default();
                    let mut stale = 0u32;
                    while !stop.load(Ordering::Acquire) {
                        let floor = invalidated.load(Ordering::Acquire);
                        if resolve(&shared, &front, &db, exp, now) < floor {
                            stale += 1;
                        }
                    }
                    stale
                })
            })
            .collect();
        for version in 1..=3_000u64 {
            db.store(version, Ordering::Release); // the change commits…
            shared.invalidate(&Invalidation::Session("s1".into())); // …then invalidates
            invalidated.store(version, Ordering::Release);
            // Let the readers run at this generation, so that a stale entry
            // filled at it would be served rather than voided by the next.
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
        stop.store(true, Ordering::Release);
        let stale: u32 = readers.into_iter().map(|r| r.join().unwrap()).sum();
        assert_eq!(
            stale, 0,
            "requests served a revoked principal after its invalidation returned"
        );
    }
}
