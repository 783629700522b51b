//! Operator commands that work on the database directly, without a running
//! kernel: `admin create`, `tenant create|list|suspend|activate`, `keys rotate`,
//! `keys rotate-master`, `audit verify`, `audit checkpoint`. Each applies pending migrations first,
//! as `serve` does, and audits what it changes as the `system` actor.

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;

use aibos_kernel::audit::AuditContext;
use aibos_kernel::audit::checkpoint::{self, Checkpoint, TrustedKeys};
use aibos_kernel::config::{Config, ConfigSources};
use aibos_kernel::db::{Db, migrate};
use aibos_kernel::identity::{SYSTEM_TENANT_ID, admin, password, store as identity_store};
use aibos_kernel::secrets::source as secrets_source;
use aibos_kernel::secrets::{MasterKey, MasterKeys};
use clap::{Args, Subcommand};

use super::{EXIT_FAILURE, EXIT_OK, load_config, print_json};

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create a platform administrator in the system tenant (the offline bootstrap).
    Create {
        /// The administrator's email.
        #[arg(long)]
        email: String,
        /// Display name.
        #[arg(long, default_value = "Administrator")]
        name: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        /// The password (prefer --password-stdin: arguments are visible to other users).
        #[arg(long, env = "AIBOS_ADMIN_PASSWORD", hide_env_values = true)]
        password: Option<String>,
        #[command(flatten)]
        json: JsonFlag,
    },
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant with its built-in roles.
    Create {
        /// `^[a-z0-9][a-z0-9-]{1,62}$`.
        #[arg(long)]
        slug: String,
        /// Display name.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// List tenants.
    List(JsonFlag),
    /// Suspend a tenant: its tokens get 403 TENANT_SUSPENDED from the next request on.
    Suspend {
        /// Slug or id.
        slug: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Reactivate a suspended tenant.
    Activate {
        /// Slug or id.
        slug: String,
        #[command(flatten)]
        json: JsonFlag,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Add a new token-signing key; older keys keep verifying until their tokens expire.
    Rotate(JsonFlag),
    /// Re-seal every stored secret under a new master key, in one transaction
    /// (docs/security.md, "Master key"). Opens them with the configured key
    /// (and auth.previous_master_key).
    RotateMaster {
        /// The new key's file; created with a new random key (mode 0600) if it
        /// does not exist. Without it: the configured auth.master_key, to finish
        /// a rotation begun by configuring the old key as auth.previous_master_key.
        #[arg(long, value_name = "FILE")]
        new_key_file: Option<PathBuf>,
        #[command(flatten)]
        json: JsonFlag,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recompute every chain (or one tenant's) and name the first broken seq; exit 1 if any is broken.
    Verify {
        /// Only this tenant (slug or id).
        #[arg(long)]
        tenant: Option<String>,
        /// Also prove that nothing up to this signed checkpoint changed since it was made.
        #[arg(long, value_name = "FILE")]
        checkpoint: Option<PathBuf>,
        /// The Ed25519 public key the checkpoint must be signed with, kept outside
        /// the database: the JWK from /.well-known/jwks.json, its "x" (base64url)
        /// or 64 hex digits. Without it, any key stored in the database is accepted.
        #[arg(long, value_name = "KEY", requires = "checkpoint")]
        public_key: Option<String>,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Sign the head of a tenant's chain with the kernel's Ed25519 key.
    Checkpoint {
        /// The tenant (slug or id); the system tenant by default.
        #[arg(long)]
        tenant: Option<String>,
        /// Write the checkpoint here instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

async fn open(sources: &ConfigSources, json: bool) -> Result<(Config, Db), u8> {
    let config = load_config(sources, json)?;
    let db = Db::connect(&config.database).await.map_err(|e| {
        eprintln!("error: {e}");
        EXIT_FAILURE
    })?;
    if let Err(e) = migrate::up(&db, migrate::embedded(db.engine())).await {
        eprintln!("error: {e}");
        return Err(EXIT_FAILURE);
    }
    Ok((config, db))
}

/// The master keys of this configuration, as `serve` loads them (generating
/// the key file on a database that holds no sealed secret yet).
async fn master_keys(
    sources: &ConfigSources,
    config: &Config,
    db: &Db,
) -> Result<Arc<MasterKeys>, u8> {
    secrets_source::load(&config.auth, &config.database, &sources.base_dir, db)
        .await
        .map(Arc::new)
        .map_err(fail)
}

fn fail(e: impl std::fmt::Debug + std::fmt::Display) -> u8 {
    eprintln!("error: {e}");
    EXIT_FAILURE
}

pub async fn admin(sources: ConfigSources, command: AdminCommand) -> u8 {
    let AdminCommand::Create {
        email,
        name,
        password_stdin,
        password,
        json,
    } = command;
    let (config, db) = match open(&sources, json.json).await {
        Ok(x) => x,
        Err(code) => return code,
    };
    let text = if password_stdin {
        let mut line = String::new();
        if std::io::stdin().lock().read_line(&mut line).is_err() {
            return fail("cannot read the password from standard input");
        }
        line.trim_end_matches(['\n', '\r']).to_owned()
    } else if let Some(p) = password {
        p
    } else {
        return fail("give the password with --password-stdin (or AIBOS_ADMIN_PASSWORD)");
    };
    let pw = match password::Password::parse(text) {
        Ok(pw) => pw,
        Err(m) => return fail(format!("password {m}")),
    };
    let result =
        admin::create_platform_admin(&db, &email, &name, pw, config.audit.redact_keys.clone())
            .await;
    db.close().await;
    match result {
        Ok(user) => {
            if json.json {
                print_json(
                    &serde_json::json!({ "tenant_id": SYSTEM_TENANT_ID, "user_id": user.id, "email": user.email }),
                );
            } else {
                println!(
                    "created platform administrator {} ({}) in the system tenant",
                    user.email, user.id
                );
            }
            EXIT_OK
        }
        Err(e) => fail(format!("{e:?}")),
    }
}

pub async fn tenant(sources: ConfigSources, command: TenantCommand) -> u8 {
    let json = match &command {
        TenantCommand::Create { json, .. }
        | TenantCommand::Suspend { json, .. }
        | TenantCommand::Activate { json, .. } => json.json,
        TenantCommand::List(j) => j.json,
    };
    let (config, db) = match open(&sources, json).await {
        Ok(x) => x,
        Err(code) => return code,
    };
    let keys = config.audit.redact_keys.clone();
    let result = match command {
        TenantCommand::Create { slug, name, .. } => {
            let slug = match aibos_kernel::identity::parse_slug(&slug) {
                Ok(s) => s,
                Err(m) => return fail(format!("slug {m}")),
            };
            let ctx = AuditContext::system(SYSTEM_TENANT_ID);
            // Nothing cached anywhere holds a tenant that did not exist.
            aibos_kernel::change::write_db(&db, ctx, keys, move |tx, c| {
                Box::pin(async move { admin::create_tenant(tx, c, &slug, &name).await })
            })
            .await
            .map(|(t, _done)| vec![t])
        }
        TenantCommand::List(_) => identity_store::all_tenants(&db).await.map_err(Into::into),
        TenantCommand::Suspend { slug, .. } => {
            admin::set_tenant_status(&db, &slug, "suspended", keys)
                .await
                .map(|t| vec![t])
        }
        TenantCommand::Activate { slug, .. } => {
            admin::set_tenant_status(&db, &slug, "active", keys)
                .await
                .map(|t| vec![t])
        }
    };
    db.close().await;
    match result {
        Ok(tenants) => {
            if json {
                print_json(&tenants);
            } else {
                for t in tenants {
                    println!("{:<24} {:<10} {}  {}", t.slug, t.status, t.id, t.name);
                }
            }
            EXIT_OK
        }
        Err(e) => fail(format!("{e:?}")),
    }
}

pub async fn keys(sources: ConfigSources, command: KeysCommand) -> u8 {
    let json = match command {
        KeysCommand::Rotate(json) => json,
        KeysCommand::RotateMaster { new_key_file, json } => {
            return rotate_master(sources, new_key_file, json.json).await;
        }
    };
    let (config, db) = match open(&sources, json.json).await {
        Ok(x) => x,
        Err(code) => return code,
    };
    let master = match master_keys(&sources, &config, &db).await {
        Ok(m) => m,
        Err(code) => {
            db.close().await;
            return code;
        }
    };
    let result = admin::rotate_keys(&db, &master, config.audit.redact_keys.clone()).await;
    db.close().await;
    match result {
        Ok(key) => {
            if json.json {
                print_json(&serde_json::json!({ "kid": key.kid, "public_key": key.public_text() }));
            } else {
                println!(
                    "new signing key {} is active; running kernels pick it up within 30 s",
                    key.kid
                );
            }
            EXIT_OK
        }
        Err(e) => fail(format!("{e:?}")),
    }
}

async fn rotate_master(sources: ConfigSources, new_key_file: Option<PathBuf>, json: bool) -> u8 {
    let (config, db) = match open(&sources, json).await {
        Ok(x) => x,
        Err(code) => return code,
    };
    let code = rotate_master_on(&sources, &config, &db, new_key_file, json).await;
    db.close().await;
    code
}

async fn rotate_master_on(
    sources: &ConfigSources,
    config: &Config,
    db: &Db,
    new_key_file: Option<PathBuf>,
    json: bool,
) -> u8 {
    let keys = match master_keys(sources, config, db).await {
        Ok(k) => k,
        Err(code) => return code,
    };
    let (new, source, created) = match new_key_file {
        Some(file) => {
            let path = sources.base_dir.join(file);
            let created = !path.exists();
            let key = if created {
                secrets_source::write_new_key_file(&path)
            } else {
                secrets_source::read_key_file(&path)
            };
            match key {
                Ok(k) => (k, path.display().to_string(), created),
                Err(e) => return fail(e),
            }
        }
        None => {
            // The configured key seals; re-read it (MasterKeys hands out no copy).
            let key = match &config.auth.master_key {
                Some(k) => MasterKey::parse(k.expose()).map_err(|e| e.to_string()),
                None => secrets_source::read_key_file(&secrets_source::key_file(
                    &config.auth,
                    &config.database,
                    &sources.base_dir,
                ))
                .map_err(|e| e.to_string()),
            };
            match key {
                Ok(k) => (k, keys.source().to_owned(), false),
                Err(e) => return fail(e),
            }
        }
    };
    let new_id = new.id().to_owned();
    let new = Arc::new(MasterKeys::single(new));
    match secrets_source::reseal_all(db, keys, new, config.audit.redact_keys.clone()).await {
        Ok(count) => {
            if json {
                print_json(
                    &serde_json::json!({ "key_id": new_id, "key_source": source, "key_file_created": created, "resealed": count }),
                );
            } else {
                println!("re-sealed {count} stored secret(s) under master key {new_id} ({source})");
                if created {
                    println!(
                        "the new key was generated into {source} (mode 0600); back it up with the database"
                    );
                }
                println!(
                    "now configure this key (auth.master_key or auth.master_key_file) on every instance and restart them; the old key is no longer needed once they all run with it"
                );
            }
            EXIT_OK
        }
        Err(e) => fail(e),
    }
}

pub async fn audit(sources: ConfigSources, command: AuditCommand) -> u8 {
    let json = match &command {
        AuditCommand::Verify { json, .. } => json.json,
        AuditCommand::Checkpoint { .. } => true,
    };
    let (config, db) = match open(&sources, json).await {
        Ok(x) => x,
        Err(code) => return code,
    };
    let code = match command {
        AuditCommand::Verify {
            tenant,
            checkpoint,
            public_key,
            json,
        } => verify(&db, tenant, checkpoint, public_key, json.json).await,
        AuditCommand::Checkpoint { tenant, out } => match master_keys(&sources, &config, &db).await
        {
            Ok(master) => make_checkpoint(&db, &master, tenant, out).await,
            Err(code) => code,
        },
    };
    db.close().await;
    code
}

async fn resolve_tenant(db: &Db, key: &str) -> Result<String, u8> {
    match identity_store::tenant_by_slug_or_id(db, key).await {
        Ok(Some(t)) => Ok(t.id),
        Ok(None) => Err(fail(format!("no tenant {key}"))),
        Err(e) => Err(fail(e)),
    }
}

async fn verify(
    db: &Db,
    tenant: Option<String>,
    checkpoint_file: Option<PathBuf>,
    public_key: Option<String>,
    json: bool,
) -> u8 {
    if let Some(file) = checkpoint_file {
        let checkpoint: Checkpoint = match std::fs::read_to_string(&file)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
        {
            Ok(c) => c,
            Err(e) => {
                return fail(format!(
                    "cannot read the checkpoint {}: {e}",
                    file.display()
                ));
            }
        };
        let trusted = match public_key {
            Some(text) => match checkpoint::parse_public_key(&text) {
                Ok(key) => TrustedKeys::Pinned(key),
                Err(e) => return fail(format!("--public-key: {e}")),
            },
            None => match identity_store::all_public_keys(db).await {
                Ok(k) => TrustedKeys::Database(k),
                Err(e) => return fail(e),
            },
        };
        return match checkpoint::verify(db, &checkpoint, &trusted).await {
            Ok(result) => {
                if json {
                    print_json(&result);
                } else if result.valid {
                    println!(
                        "ok: tenant {} is unchanged up to seq {} since the checkpoint",
                        result.tenant_id, result.seq
                    );
                } else {
                    println!(
                        "BROKEN: tenant {}: {}",
                        result.tenant_id,
                        result.reason.clone().unwrap_or_default()
                    );
                }
                if result.valid { EXIT_OK } else { EXIT_FAILURE }
            }
            Err(e) => fail(e),
        };
    }
    let tenants = match tenant {
        Some(key) => match resolve_tenant(db, &key).await {
            Ok(id) => vec![id],
            Err(code) => return code,
        },
        None => match aibos_kernel::audit::store::tenants_with_entries(db).await {
            Ok(t) => t,
            Err(e) => return fail(e),
        },
    };
    let mut results = Vec::new();
    for tenant_id in tenants {
        match aibos_kernel::audit::store::verify_tenant(db, &tenant_id, None).await {
            Ok(v) => results.push(v),
            Err(e) => return fail(e),
        }
    }
    let all_valid = results.iter().all(|v| v.valid);
    if json {
        print_json(&serde_json::json!({ "valid": all_valid, "tenants": results }));
    } else {
        for v in &results {
            match v.first_bad_seq {
                None => println!("ok      tenant {} ({} entries)", v.tenant_id, v.entries),
                Some(seq) => println!(
                    "BROKEN  tenant {} at seq {seq}: {}",
                    v.tenant_id,
                    v.reason.clone().unwrap_or_default()
                ),
            }
        }
    }
    if all_valid { EXIT_OK } else { EXIT_FAILURE }
}

async fn make_checkpoint(
    db: &Db,
    master: &Arc<MasterKeys>,
    tenant: Option<String>,
    out: Option<PathBuf>,
) -> u8 {
    let tenant_id = match tenant {
        Some(key) => match resolve_tenant(db, &key).await {
            Ok(id) => id,
            Err(code) => return code,
        },
        None => SYSTEM_TENANT_ID.to_owned(),
    };
    let key = match admin::checkpoint_key(db, master).await {
        Ok(k) => k,
        Err(e) => return fail(format!("{e:?}")),
    };
    match checkpoint::make(db, &key, &tenant_id).await {
        Ok(cp) => {
            let text = serde_json::to_string_pretty(&cp).unwrap_or_default();
            match out {
                Some(path) => {
                    if let Err(e) = std::fs::write(&path, text + "\n") {
                        return fail(format!("cannot write {}: {e}", path.display()));
                    }
                    eprintln!(
                        "checkpoint of tenant {} at seq {} written to {}",
                        cp.tenant_id,
                        cp.seq,
                        path.display()
                    );
                }
                None => println!("{text}"),
            }
            EXIT_OK
        }
        Err(e) => fail(e),
    }
}
