//! Authorization: permission names, grants, the authenticated [`Caller`], the
//! principal cache that makes a permission check nearly free, and the RBAC
//! resources (roles, assignments, delegations, break-glass).
//!
//! A handler names what it needs in its first lines:
//! `let caller = caller.require(&state, &[perm::USER_MANAGE]).await?;`
//! A missing permission answers 403 with `missing_permissions` and writes an
//! `authz.deny` audit entry.

pub mod cache;
pub mod caller;
pub mod listener;
pub mod routes;
pub mod store;

pub use caller::Caller;

/// The kernel's own permissions (seeded by migration 0002).
pub mod perm {
    /// Create, change and suspend tenants (platform administrators only).
    pub const TENANT_MANAGE: &str = "kernel.tenant.manage";
    /// Read users.
    pub const USER_READ: &str = "kernel.user.read";
    /// Create and change users.
    pub const USER_MANAGE: &str = "kernel.user.manage";
    /// Read roles and the permission registry.
    pub const ROLE_READ: &str = "kernel.role.read";
    /// Create, change, delete and assign roles.
    pub const ROLE_MANAGE: &str = "kernel.role.manage";
    /// Read canons.
    pub const CANON_READ: &str = "kernel.canon.read";
    /// Manage canons.
    pub const CANON_MANAGE: &str = "kernel.canon.manage";
    /// Read routes.
    pub const ROUTE_READ: &str = "kernel.route.read";
    /// Manage routes.
    pub const ROUTE_MANAGE: &str = "kernel.route.manage";
    /// Publish events.
    pub const EVENT_PUBLISH: &str = "kernel.event.publish";
    /// Read events.
    pub const EVENT_READ: &str = "kernel.event.read";
    /// Manage webhook subscriptions.
    pub const SUBSCRIPTION_MANAGE: &str = "kernel.subscription.manage";
    /// Read webhook subscriptions and their delivery history (seeded by migration 0010).
    pub const SUBSCRIPTION_READ: &str = "kernel.subscription.read";
    /// Read and verify the audit trail.
    pub const AUDIT_READ: &str = "kernel.audit.read";
    /// Delegate one's own permissions.
    pub const DELEGATION_CREATE: &str = "kernel.delegation.create";
    /// Request break-glass elevation.
    pub const BREAKGLASS_REQUEST: &str = "kernel.breakglass.request";
    /// Manage service accounts.
    pub const SERVICE_ACCOUNT_MANAGE: &str = "kernel.service_account.manage";

    /// Permissions over platform resources (tenants, and the canons and routes
    /// every tenant's calls go through): only the system tenant may hold them.
    pub const PLATFORM: &[&str] = &[
        TENANT_MANAGE,
        CANON_READ,
        CANON_MANAGE,
        ROUTE_READ,
        ROUTE_MANAGE,
    ];

    /// Every kernel permission.
    pub const ALL: &[&str] = &[
        TENANT_MANAGE,
        USER_READ,
        USER_MANAGE,
        ROLE_READ,
        ROLE_MANAGE,
        CANON_READ,
        CANON_MANAGE,
        ROUTE_READ,
        ROUTE_MANAGE,
        EVENT_PUBLISH,
        EVENT_READ,
        SUBSCRIPTION_MANAGE,
        SUBSCRIPTION_READ,
        AUDIT_READ,
        DELEGATION_CREATE,
        BREAKGLASS_REQUEST,
        SERVICE_ACCOUNT_MANAGE,
    ];
}

/// The built-in role of every tenant: all kernel permissions but tenant management
/// (and, outside the system tenant, but the other platform permissions).
pub const TENANT_ADMIN_ROLE: &str = "tenant.admin";
/// The built-in role of the system tenant's administrators: tenant management.
pub const PLATFORM_ADMIN_ROLE: &str = "platform.admin";

/// Permissions of [`TENANT_ADMIN_ROLE`] in `tenant_id`.
pub fn tenant_admin_permissions(tenant_id: &str) -> Vec<String> {
    let system = tenant_id == crate::identity::SYSTEM_TENANT_ID;
    perm::ALL
        .iter()
        .filter(|p| **p != perm::TENANT_MANAGE)
        .filter(|p| system || !perm::PLATFORM.contains(p))
        .map(|p| p.to_string())
        .collect()
}

/// What the built-in [`TENANT_ADMIN_ROLE`] does not hold in `tenant_id`:
/// tenant management anywhere, and the other platform permissions outside the
/// system tenant. Everything else of its tenant it holds, the permissions canons
/// register included, so that it can give them (no one gives what they lack).
pub fn tenant_admin_exclusions(tenant_id: &str) -> &'static [&'static str] {
    if tenant_id == crate::identity::SYSTEM_TENANT_ID {
        &[perm::TENANT_MANAGE]
    } else {
        perm::PLATFORM
    }
}

/// The permissions a role gives in `tenant_id`: its grants, or for the built-in
/// [`TENANT_ADMIN_ROLE`] everything but [`tenant_admin_exclusions`].
pub fn role_permissions(
    tenant_id: &str,
    name: &str,
    builtin: bool,
    grants: &[String],
) -> PermissionSet {
    let mut set = PermissionSet::of(grants);
    if builtin && name == TENANT_ADMIN_ROLE {
        set.add_everything_but(tenant_admin_exclusions(tenant_id));
    }
    set
}

/// Permissions break-glass never grants: those that manage identities or
/// permissions, through which a time-bound elevation could make itself lasting.
pub const BREAK_GLASS_EXCLUDED: &[&str] = &[
    perm::TENANT_MANAGE,
    perm::USER_MANAGE,
    perm::ROLE_MANAGE,
    perm::DELEGATION_CREATE,
    perm::SERVICE_ACCOUNT_MANAGE,
    perm::BREAKGLASS_REQUEST,
];

/// Whether `grant` (a name or a prefix grant) covers a platform permission.
pub fn covers_platform_permission(grant: &str) -> bool {
    let mut set = PermissionSet::default();
    set.add(grant);
    perm::PLATFORM.iter().any(|p| set.contains(p))
}

/// Whether `name` is a canonical permission name:
/// `^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*){1,4}$`.
pub fn is_permission_name(name: &str) -> bool {
    let segments: Vec<&str> = name.split('.').collect();
    (2..=5).contains(&segments.len()) && segments.iter().all(|s| is_segment(s))
}

fn is_segment(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some('a'..='z'))
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Whether `grant` is a permission name or a prefix grant (`finance.*`, `kernel.user.*`).
pub fn is_grant(grant: &str) -> bool {
    match grant.strip_suffix(".*") {
        Some(prefix) => {
            let segments: Vec<&str> = prefix.split('.').collect();
            (1..=4).contains(&segments.len()) && segments.iter().all(|s| is_segment(s))
        }
        None => is_permission_name(grant),
    }
}

/// A set of grants, answering "does it hold this permission?" in O(1) for exact
/// grants and O(prefixes) for prefix grants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PermissionSet {
    /// A fast hash: the names are the registry's and the roles', and every
    /// authorized request looks one up.
    exact: foldhash::HashSet<String>,
    prefixes: Vec<String>,
    /// The built-in `tenant.admin` holds every permission of its tenant, those
    /// canons register later included, but these (the platform's): `Some` then.
    everything_but: Option<Vec<String>>,
}

impl PermissionSet {
    /// The set of these grants (exact names and `prefix.*`).
    pub fn of(grants: &[String]) -> PermissionSet {
        let mut set = PermissionSet::default();
        for grant in grants {
            set.add(grant);
        }
        set
    }

    /// Adds a grant (exact name or `prefix.*`).
    pub fn add(&mut self, grant: &str) {
        match grant.strip_suffix('*') {
            Some(prefix) if prefix.ends_with('.') => {
                if !self.prefixes.iter().any(|p| p == prefix) {
                    self.prefixes.push(prefix.to_owned());
                }
            }
            _ => {
                self.exact.insert(grant.to_owned());
            }
        }
    }

    /// Adds every permission but `excluded` (the built-in administrator's hold).
    /// Two such holds make one that excludes only what both exclude.
    pub fn add_everything_but(&mut self, excluded: &[&str]) {
        let excluded: Vec<String> = match &self.everything_but {
            Some(before) => before
                .iter()
                .filter(|p| excluded.contains(&p.as_str()))
                .cloned()
                .collect(),
            None => excluded.iter().map(|p| p.to_string()).collect(),
        };
        self.everything_but = Some(excluded);
    }

    /// Adds everything `other` holds.
    pub fn extend(&mut self, other: &PermissionSet) {
        for grant in other.exact.iter().chain(&other.prefixes) {
            match grant.ends_with('.') {
                true => self.add(&format!("{grant}*")),
                false => self.add(grant),
            }
        }
        if let Some(excluded) = &other.everything_but {
            let excluded: Vec<&str> = excluded.iter().map(String::as_str).collect();
            self.add_everything_but(&excluded);
        }
    }

    /// Whether `permission` is granted.
    pub fn contains(&self, permission: &str) -> bool {
        self.exact.contains(permission)
            || self
                .prefixes
                .iter()
                .any(|p| permission.starts_with(p.as_str()))
            || self
                .everything_but
                .as_ref()
                .is_some_and(|excluded| !excluded.iter().any(|p| p == permission))
    }

    /// Whether holding this set allows giving `grant` (an exact name, or a
    /// `prefix.*` that only a holder of that prefix or a wider one may give:
    /// holding every permission under it today does not cover those a canon
    /// registers tomorrow).
    pub fn covers(&self, grant: &str) -> bool {
        let Some(prefix) = grant.strip_suffix('*').filter(|p| p.ends_with('.')) else {
            return self.contains(grant);
        };
        self.prefixes.iter().any(|p| prefix.starts_with(p.as_str()))
            || self
                .everything_but
                .as_ref()
                .is_some_and(|excluded| !excluded.iter().any(|p| p.starts_with(prefix)))
    }

    /// What of `self` lies outside `other`: empty when everything this set
    /// holds, `other` holds (and may give) too.
    pub fn outside(&self, other: &PermissionSet) -> Vec<String> {
        let mut missing: Vec<String> = self
            .exact
            .iter()
            .filter(|g| !other.covers(g))
            .cloned()
            .collect();
        missing.extend(
            self.prefixes
                .iter()
                .map(|p| format!("{p}*"))
                .filter(|g| !other.covers(g)),
        );
        if let Some(excluded) = &self.everything_but {
            let within = other
                .everything_but
                .as_ref()
                .is_some_and(|theirs| theirs.iter().all(|p| excluded.contains(p)));
            if !within {
                missing.push(crate::authz::TENANT_ADMIN_ROLE.to_owned());
            }
        }
        missing.sort();
        missing.dedup();
        missing
    }

    /// Whether it holds everything but a few (the built-in administrator).
    pub fn contains_everything_but_some(&self) -> bool {
        self.everything_but.is_some()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty() && self.everything_but.is_none()
    }

    /// The grants, sorted (exact names and `prefix.*`).
    pub fn grants(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .exact
            .iter()
            .cloned()
            .chain(self.prefixes.iter().map(|p| format!("{p}*")))
            .collect();
        all.sort();
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn permission_names_table() {
        for ok in [
            "kernel.user.read",
            "finance.payment.execute",
            "a.b",
            "a1.b_2.c.d.e",
        ] {
            assert!(is_permission_name(ok), "{ok}");
        }
        for bad in [
            "kernel",
            "Kernel.user",
            "kernel..user",
            "kernel.user.",
            "1a.b",
            "a.b.c.d.e.f",
            "a.b-c",
            "a.*",
            "' OR 1=1",
        ] {
            assert!(!is_permission_name(bad), "{bad}");
        }
        assert!(is_grant("finance.*"));
        assert!(is_grant("kernel.user.*"));
        assert!(!is_grant("*"));
        assert!(!is_grant("finance.*.x"));
    }

    #[test]
    fn prefix_grants_cover_their_subtree_only() {
        let mut set = PermissionSet::default();
        set.add("finance.*");
        set.add("kernel.user.read");
        assert!(set.contains("finance.payment.execute"));
        assert!(set.contains("kernel.user.read"));
        assert!(!set.contains("kernel.user.manage"));
        assert!(!set.contains("financex.payment"));
        assert_eq!(
            set.grants(),
            vec!["finance.*".to_owned(), "kernel.user.read".to_owned()]
        );
    }

    #[test]
    fn the_built_in_administrator_covers_all_but_the_platform() {
        let tenant = role_permissions("t1", TENANT_ADMIN_ROLE, true, &[]);
        assert!(
            tenant.contains("finance.payment.execute"),
            "canon permissions, later ones too"
        );
        assert!(tenant.covers("finance.*") && tenant.covers("kernel.user.*"));
        assert!(!tenant.contains(perm::TENANT_MANAGE) && !tenant.contains(perm::CANON_MANAGE));
        assert!(!tenant.covers("kernel.*") && !tenant.covers("kernel.canon.*"));
        let system = role_permissions(
            crate::identity::SYSTEM_TENANT_ID,
            TENANT_ADMIN_ROLE,
            true,
            &[],
        );
        assert!(system.contains(perm::CANON_MANAGE) && !system.contains(perm::TENANT_MANAGE));
        // A role named like it but not built in is an ordinary role.
        assert!(!role_permissions("t1", TENANT_ADMIN_ROLE, false, &[]).contains("a.b"));
        // Only a holder of as much may act on an administrator.
        assert!(tenant.outside(&tenant).is_empty());
        assert!(
            !tenant
                .outside(&PermissionSet::of(&["kernel.user.manage".into()]))
                .is_empty()
        );
        assert!(
            !system.outside(&tenant).is_empty(),
            "the system's excludes less"
        );
        assert!(tenant.outside(&system).is_empty());
    }

    fn grant_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            "(a|b)\\.(x|y)\\.(p|q)",
            "(a|b)\\.\\*",
            "(a|b)\\.(x|y)\\.\\*",
        ]
    }

    proptest! {
        /// What `outside` calls within is within: a set all of whose grants
        /// another covers holds nothing that other does not.
        #[test]
        fn covered_sets_hold_nothing_more(
            mine in proptest::collection::vec(grant_strategy(), 0..6),
            theirs in proptest::collection::vec(grant_strategy(), 0..6),
            admin in any::<bool>(),
            names in proptest::collection::vec("(a|b|c)\\.(x|y)\\.(p|q)", 1..20),
        ) {
            let mut giver = PermissionSet::of(&mine);
            if admin {
                giver.add_everything_but(&["a.x.p"]);
            }
            let given = PermissionSet::of(&theirs);
            if given.outside(&giver).is_empty() {
                for name in &names {
                    prop_assert!(!given.contains(name) || giver.contains(name), "{name}");
                }
            }
            for grant in &theirs {
                if giver.covers(grant) && !grant.ends_with('*') {
                    prop_assert!(giver.contains(grant));
                }
            }
        }

        #[test]
        fn every_accepted_name_is_also_a_grant(name in "[a-z][a-z0-9_]{0,5}(\\.[a-z][a-z0-9_]{0,5}){1,4}") {
            prop_assert!(is_permission_name(&name));
            prop_assert!(is_grant(&name));
            let mut set = PermissionSet::default();
            set.add(&name);
            prop_assert!(set.contains(&name));
        }
    }
}
