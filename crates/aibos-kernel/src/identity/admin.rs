//! Operations the API and the offline CLI share, so `aibos admin create` and
//! `POST /api/kernel/bootstrap` cannot drift apart.

use std::sync::Arc;

use uuid::Uuid;

use super::store::{self, Tenant, User};
use super::{SYSTEM_TENANT_ID, password};
use crate::audit::{self, AuditContext, AuditEvent};
use crate::authz::{self, PLATFORM_ADMIN_ROLE, TENANT_ADMIN_ROLE, store as authz_store};
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

/// Creates a user holding the tenant's administrator role(s), with audit
/// entries, inside `tx`. In the system tenant the user is a platform administrator.
pub async fn create_admin(
    tx: &mut Tx,
    ctx: &AuditContext,
    tenant_id: &str,
    email: &str,
    name: &str,
    password_hash: &str,
    redact_keys: &[String],
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
    audit::record(
        tx,
        ctx,
        AuditEvent::new("user.created")
            .resource("user", &user.id)
            .details(serde_json::json!({ "email": user.email, "name": user.name })),
        redact_keys,
    )
    .await?;
    for role_id in std::iter::once(tenant_admin).chain(platform_admin) {
        authz_store::assign_role(tx, tenant_id, &user.id, &role_id, None).await?;
        audit::record(
            tx,
            ctx,
            AuditEvent::new("role.assigned")
                .resource("user", &user.id)
                .details(serde_json::json!({ "role_id": role_id })),
            redact_keys,
        )
        .await?;
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
    db.write(move |tx| {
        Box::pin(async move {
            let ctx = AuditContext::system(SYSTEM_TENANT_ID);
            create_admin(
                tx,
                &ctx,
                SYSTEM_TENANT_ID,
                &email,
                &name,
                &hash,
                &redact_keys,
            )
            .await
        })
    })
    .await
}

/// Creates a tenant with its built-in roles; the entry goes to the actor's chain.
pub async fn create_tenant(
    tx: &mut Tx,
    ctx: &AuditContext,
    slug: &str,
    name: &str,
    redact_keys: &[String],
) -> Result<Tenant, ApiError> {
    let tenant = store::insert_tenant(tx, &Uuid::now_v7().to_string(), slug, name).await?;
    ensure_builtin_roles(tx, &tenant.id).await?;
    audit::record(
        tx,
        ctx,
        AuditEvent::new("tenant.created")
            .resource("tenant", &tenant.id)
            .details(serde_json::json!({ "slug": tenant.slug, "name": tenant.name })),
        redact_keys,
    )
    .await?;
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
    db.write(move |tx| {
        Box::pin(async move {
            let tenant = store::update_tenant(tx, &id, None, Some(status), None)
                .await?
                .ok_or_else(|| ApiError::not_found("No such tenant."))?;
            let action = if status == "suspended" {
                "tenant.suspended"
            } else {
                "tenant.updated"
            };
            let ctx = AuditContext::system(SYSTEM_TENANT_ID);
            audit::record(
                tx,
                &ctx,
                AuditEvent::new(action)
                    .resource("tenant", &tenant.id)
                    .details(serde_json::json!({ "status": status })),
                &redact_keys,
            )
            .await?;
            tx.notify(
                crate::authz::cache::NOTIFY_CHANNEL,
                &crate::authz::cache::Invalidation::Tenant(tenant.id.clone()).payload(),
            )
            .await?;
            Ok(tenant)
        })
    })
    .await
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
    db.write(move |tx| {
        Box::pin(async move {
            store::rotate_signing_key(tx, &master, &stored).await?;
            let ctx = AuditContext::system(SYSTEM_TENANT_ID);
            audit::record(
                tx,
                &ctx,
                AuditEvent::new("key.rotated")
                    .resource("signing_key", &stored.kid)
                    .severity("warning"),
                &redact_keys,
            )
            .await?;
            tx.notify(
                crate::authz::cache::NOTIFY_CHANNEL,
                &crate::authz::cache::Invalidation::All.payload(),
            )
            .await?;
            Ok::<_, ApiError>(())
        })
    })
    .await?;
    Ok(key)
}
