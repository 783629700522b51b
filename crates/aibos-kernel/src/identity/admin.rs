//! Operations the API and the offline CLI share, so `aibos admin create` and
//! `POST /api/kernel/bootstrap` cannot drift apart.

use std::sync::Arc;

use uuid::Uuid;

use super::store::{self, Tenant, User};
use super::{SYSTEM_TENANT_ID, password};
use crate::audit::{AuditContext, AuditEvent};
use crate::authz::cache::Invalidation;
use crate::authz::{self, PLATFORM_ADMIN_ROLE, TENANT_ADMIN_ROLE, store as authz_store};
use crate::change::{self, Change};
use crate::db::{Db, Tx};
use crate::error::ApiError;
use crate::secrets::MasterKeys;

/// Creates the tenant's built-in roles if missing; returns `(tenant.admin id, platform.admin id)`.
pub async fn ensure_builtin_roles(
    tx: &mut Tx,
    tenant_id: &str,
) -> Result<(String, Option<String>), sqlx::Error> {
    let tenant_admin = match authz_store::role_by_name(tx, tenant_id, TENANT_ADMIN_ROLE).await? {
        Some(role) => role.id,
        None => {
            authz_store::insert_role(
                tx,
                &Uuid::now_v7().to_string(),
                tenant_id,
                TENANT_ADMIN_ROLE,
                &authz::tenant_admin_permissions(tenant_id),
                true,
            )
            .await?
            .id
        }
    };
    let platform_admin = if tenant_id == SYSTEM_TENANT_ID {
        Some(
            match authz_store::role_by_name(tx, tenant_id, PLATFORM_ADMIN_ROLE).await? {
                Some(role) => role.id,
                None => {
                    let grants = vec![authz::perm::TENANT_MANAGE.to_owned()];
                    authz_store::insert_role(
                        tx,
                        &Uuid::now_v7().to_string(),
                        tenant_id,
                        PLATFORM_ADMIN_ROLE,
                        &grants,
                        true,
                    )
                    .await?
                    .id
                }
            },
        )
    } else {
        None
    };
    Ok((tenant_admin, platform_admin))
}

/// Creates a user holding the tenant's administrator role(s), with their
/// audit entries and kernel events, inside `tx`. In the system tenant the user
/// is a platform administrator.
pub async fn create_admin(
    tx: &mut Tx,
    c: &mut Change,
    tenant_id: &str,
    email: &str,
    name: &str,
    password_hash: &str,
) -> Result<User, ApiError> {
    let (tenant_admin, platform_admin) = ensure_builtin_roles(tx, tenant_id).await?;
    let user = store::insert_user(
        tx,
        &Uuid::now_v7().to_string(),
        tenant_id,
        email,
        name,
        password_hash,
    )
    .await?;
    c.audit(
        AuditEvent::new("user.created")
            .resource("user", &user.id)
            .details(serde_json::json!({ "email": user.email, "name": user.name })),
    )
    .publish("kernel.user.created");
    for role_id in std::iter::once(tenant_admin).chain(platform_admin) {
        authz_store::assign_role(tx, tenant_id, &user.id, &role_id, None).await?;
        c.audit(
            AuditEvent::new("role.assigned")
                .resource("user", &user.id)
                .details(serde_json::json!({ "role_id": role_id })),
        )
        .publish("kernel.role_assignment.created");
    }
    Ok(user)
}

/// `aibos admin create`: a platform administrator in the system tenant, offline.
pub async fn create_platform_admin(
    db: &Db,
    email: &str,
    name: &str,
    password: password::Password,
    redact_keys: Vec<String>,
) -> Result<User, ApiError> {
    let email = super::parse_email(email).map_err(|m| ApiError::invalid_field("email", m))?;
    let name = super::parse_name(name).map_err(|m| ApiError::invalid_field("name", m))?;
    let hash = password::Hasher::new(1)
        .hash(password)
        .await
        .map_err(|e| ApiError::internal(anyhow::anyhow!(e)))?;
    let ctx = AuditContext::system(SYSTEM_TENANT_ID);
    // Nothing cached to invalidate: no session holds a user that did not exist.
    let (user, _done) = change::write_db(db, ctx, redact_keys, move |tx, c| {
        Box::pin(async move { create_admin(tx, c, SYSTEM_TENANT_ID, &email, &name, &hash).await })
    })
    .await?;
    Ok(user)
}

/// Creates a tenant with its built-in roles; the entry and the event go to
/// the actor's tenant (the system tenant: tenants are platform resources).
pub async fn create_tenant(
    tx: &mut Tx,
    c: &mut Change,
    slug: &str,
    name: &str,
) -> Result<Tenant, ApiError> {
    let tenant = store::insert_tenant(tx, &Uuid::now_v7().to_string(), slug, name).await?;
    ensure_builtin_roles(tx, &tenant.id).await?;
    c.audit(
        AuditEvent::new("tenant.created")
            .resource("tenant", &tenant.id)
            .details(serde_json::json!({ "slug": tenant.slug, "name": tenant.name })),
    )
    .publish("kernel.tenant.created");
    Ok(tenant)
}

/// Loads the signing keys (generating the first one on first start) into a ring.
pub async fn load_key_ring(
    db: &Db,
    auth: &crate::config::AuthConfig,
    master: &Arc<MasterKeys>,
) -> Result<super::tokens::KeyRing, String> {
    let mut keys = store::signing_keys(db, master)
        .await
        .map_err(|e| e.to_string())?;
    if auth.jwt_algorithm == crate::config::JwtAlgorithm::EdDSA && !keys.iter().any(|k| k.active) {
        let key = super::tokens::StoredKey::generate();
        let stored = key.clone();
        let sealing = master.clone();
        db.write(move |tx| {
            Box::pin(async move {
                store::rotate_signing_key(tx, &sealing, &stored)
                    .await
                    .map_err(crate::db::DbError::Query)
            })
        })
        .await
        .map_err(|e| e.to_string())?;
        tracing::info!(kid = %key.kid, "generated the first token-signing key");
        keys = store::signing_keys(db, master)
            .await
            .map_err(|e| e.to_string())?;
    }
    super::tokens::KeyRing::new(auth, &keys)
}

/// The Ed25519 key that signs audit checkpoints: the active token key (created if none,
/// which happens only when tokens use HS256).
pub async fn checkpoint_key(
    db: &Db,
    master: &Arc<MasterKeys>,
) -> Result<super::tokens::StoredKey, ApiError> {
    if let Some(key) = store::signing_keys(db, master)
        .await?
        .into_iter()
        .find(|k| k.active)
    {
        return Ok(key);
    }
    let key = super::tokens::StoredKey::generate();
    let stored = key.clone();
    let master = master.clone();
    db.write(move |tx| {
        Box::pin(async move {
            store::rotate_signing_key(tx, &master, &stored)
                .await
                .map_err(ApiError::from)
        })
    })
    .await?;
    Ok(key)
}

/// Suspends or reactivates a tenant from the operator CLI, audited as the system.
pub async fn set_tenant_status(
    db: &Db,
    slug: &str,
    status: &'static str,
    redact_keys: Vec<String>,
) -> Result<Tenant, ApiError> {
    let tenant = store::tenant_by_slug_or_id(db, slug)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("No tenant {slug}.")))?;
    if tenant.id == SYSTEM_TENANT_ID && status == "suspended" {
        return Err(ApiError::conflict("The system tenant cannot be suspended."));
    }
    let id = tenant.id.clone();
    let ctx = AuditContext::system(SYSTEM_TENANT_ID);
    // A running kernel drops the tenant's principals when the NOTIFY (or, on
    // SQLite, the invalidation log) reaches it.
    let (tenant, _done) = change::write_db(db, ctx, redact_keys, move |tx, c| {
        Box::pin(async move {
            let tenant = store::update_tenant(tx, &id, None, Some(status), None)
                .await?
                .ok_or_else(|| ApiError::not_found("No such tenant."))?;
            let (action, event) = match status {
                "suspended" => ("tenant.suspended", "kernel.tenant.suspended"),
                _ => ("tenant.updated", "kernel.tenant.updated"),
            };
            c.audit(
                AuditEvent::new(action)
                    .resource("tenant", &tenant.id)
                    .details(serde_json::json!({ "status": status })),
            )
            .publish(event);
            c.invalidate(Invalidation::Tenant(tenant.id.clone()));
            Ok(tenant)
        })
    })
    .await?;
    Ok(tenant)
}

/// `aibos keys rotate`: a new active key; the previous one keeps verifying its tokens.
pub async fn rotate_keys(
    db: &Db,
    master: &Arc<MasterKeys>,
    redact_keys: Vec<String>,
) -> Result<super::tokens::StoredKey, ApiError> {
    let key = super::tokens::StoredKey::generate();
    let stored = key.clone();
    let master = master.clone();
    let ctx = AuditContext::system(SYSTEM_TENANT_ID);
    let (_, _done) = change::write_db(db, ctx, redact_keys, move |tx, c| {
        Box::pin(async move {
            store::rotate_signing_key(tx, &master, &stored).await?;
            c.audit(
                AuditEvent::new("key.rotated")
                    .resource("signing_key", &stored.kid)
                    .severity("warning"),
            );
            c.invalidate(Invalidation::All);
            Ok(())
        })
    })
    .await?;
    Ok(key)
}
