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
}

impl PermissionSet {
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

    /// Whether `permission` is granted.
    pub fn contains(&self, permission: &str) -> bool {
        self.exact.contains(permission)
            || self
                .prefixes
                .iter()
                .any(|p| permission.starts_with(p.as_str()))
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

    proptest! {
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
