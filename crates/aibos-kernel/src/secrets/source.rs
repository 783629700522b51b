//! Where the master key comes from, and what start-up does with it.
//!
//! In order: `auth.master_key` (the secrets file or `AIBOS_AUTH__MASTER_KEY`);
//! else the file `auth.master_key_file`; else the default file, `master.key`
//! beside the SQLite database (it travels with the data folder), or
//! `data/master.key` under the working directory with PostgreSQL (whose data is
//! elsewhere; several instances must be given the same key, so configure it).
//! Relative paths are resolved against the working directory the configuration
//! was loaded from ([`crate::config::ConfigSources::base_dir`]).
//!
//! When no key is configured and the file does not exist, a new key is written
//! there (mode 0600, created exclusively so two processes cannot both write
//! one) and its path logged, never the key — unless the database already holds
//! sealed values: a missing key file then means the wrong place or a lost key,
//! and a fresh key would only make the kernel refuse later; it refuses now.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr as _;

use super::store::{self, Place};
use super::{MasterKey, MasterKeys, OpenError};
use crate::config::{AuthConfig, DatabaseConfig, Engine};
use crate::db::{Db, DbError};

/// Why the master key could not be had, or does not fit the database.
#[derive(Debug, thiserror::Error)]
pub enum MasterKeyError {
    /// The key file exists but cannot be read or holds no key.
    #[error("the master key file {path} cannot be used: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The key given in the configuration is malformed (validation catches this first).
    #[error("{key} cannot be used: {reason}")]
    Configured {
        /// `auth.master_key` or `auth.previous_master_key`.
        key: &'static str,
        /// Why.
        reason: String,
    },
    /// No key configured and no key file, but the database holds sealed values.
    #[error(
        "no master key: auth.master_key is not set and the key file {path} does not exist, but the database already holds secrets sealed under master key {ids}; configure that key (auth.master_key, or auth.master_key_file naming its file) instead of letting the kernel generate a new one"
    )]
    Missing {
        /// The file looked for.
        path: String,
        /// Ids of the keys the stored values name.
        ids: String,
    },
    /// A stored secret does not open with the keys in force.
    #[error(
        "the stored {place} does not open: {reason}. Start the kernel with the master key the database's secrets were sealed with (during a rotation, the old one as auth.previous_master_key)"
    )]
    Open {
        /// Which value.
        place: String,
        /// Why.
        reason: OpenError,
    },
    /// The database could not be read or written.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for MasterKeyError {
    fn from(e: sqlx::Error) -> MasterKeyError {
        MasterKeyError::Db(DbError::Query(e))
    }
}

/// The key file used when `auth.master_key_file` is not set.
pub fn default_key_file(database: &DatabaseConfig, base_dir: &Path) -> PathBuf {
    if database.url.engine() == Engine::Sqlite
        && let Ok(options) = sqlx::sqlite::SqliteConnectOptions::from_str(database.url.expose())
        && let Some(folder) = options.get_filename().parent()
        && options.get_filename() != Path::new(":memory:")
    {
        return base_dir.join(folder).join("master.key");
    }
    base_dir.join("data").join("master.key")
}

/// The key file this configuration names or implies.
pub fn key_file(auth: &AuthConfig, database: &DatabaseConfig, base_dir: &Path) -> PathBuf {
    match &auth.master_key_file {
        Some(file) => base_dir.join(file),
        None => default_key_file(database, base_dir),
    }
}

/// Reads a key file.
pub fn read_key_file(path: &Path) -> Result<MasterKey, MasterKeyError> {
    let text = std::fs::read_to_string(path).map_err(|e| MasterKeyError::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    MasterKey::parse(&text).map_err(|reason| MasterKeyError::File {
        path: path.display().to_string(),
        reason,
    })
}

/// Writes a new random key to `path` (which must not exist), mode 0600.
pub fn write_new_key_file(path: &Path) -> Result<MasterKey, MasterKeyError> {
    let fail = |e: std::io::Error| MasterKeyError::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    if let Some(folder) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(folder).map_err(fail)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(fail)?;
    let (key, text) = MasterKey::generate();
    file.write_all(format!("{text}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(fail)?;
    Ok(key)
}

/// The master keys of this configuration, generating the key file on first
/// start (see the module documentation).
pub async fn load(
    auth: &AuthConfig,
    database: &DatabaseConfig,
    base_dir: &Path,
    db: &Db,
) -> Result<MasterKeys, MasterKeyError> {
    let previous = auth
        .previous_master_key
        .as_ref()
        .map(|k| {
            MasterKey::parse(k.expose()).map_err(|reason| MasterKeyError::Configured {
                key: "auth.previous_master_key",
                reason,
            })
        })
        .transpose()?;
    if let Some(key) = &auth.master_key {
        let key = MasterKey::parse(key.expose()).map_err(|reason| MasterKeyError::Configured {
            key: "auth.master_key",
            reason,
        })?;
        return Ok(MasterKeys::new(key, previous, "auth.master_key"));
    }
    let path = key_file(auth, database, base_dir);
    let source = format!("the key file {}", path.display());
    if path.exists() {
        return Ok(MasterKeys::new(read_key_file(&path)?, previous, source));
    }
    let sealed_under = store::sealing_key_ids(db).await?;
    if !sealed_under.is_empty() {
        return Err(MasterKeyError::Missing {
            path: path.display().to_string(),
            ids: sealed_under.join(", "),
        });
    }
    let key = match write_new_key_file(&path) {
        Ok(key) => {
            tracing::warn!(path = %path.display(), key_id = key.id(), "generated a new master key for secrets at rest; back this file up with the database, and configure auth.master_key on every instance of a shared database");
            key
        }
        // Another process sharing this folder wrote it first: use theirs.
        Err(_) if path.exists() => read_key_file(&path)?,
        Err(e) => return Err(e),
    };
    Ok(MasterKeys::new(key, previous, source))
}

/// Start-up: seals every secret still stored in clear (written by a kernel
/// from before sealing), and checks that every sealed one opens, in one
/// transaction. Returns how many were sealed now.
pub async fn seal_and_check(
    db: &Db,
    keys: &std::sync::Arc<MasterKeys>,
) -> Result<usize, MasterKeyError> {
    let keys = keys.clone();
    db.write(move |tx| {
        Box::pin(async move {
            let mut sealed_now = 0;
            for stored in store::all(tx).await? {
                let place = stored.place.associated_data();
                if super::is_sealed(&stored.value) {
                    keys.open(&stored.value, &place)
                        .map_err(|reason| open_error(&stored.place, reason))?;
                } else {
                    let sealed = keys.seal(&stored.value, &place);
                    if store::replace(tx, &stored.place, &stored.value, &sealed).await? {
                        sealed_now += 1;
                    }
                }
            }
            Ok(sealed_now)
        })
    })
    .await
}

/// Re-seals every stored secret under `new`, in one transaction, opening each
/// with `keys` (current or previous). Returns how many values were rewritten.
/// The rotation is audited (`secrets.resealed`, in the system tenant's chain)
/// in the same transaction.
pub async fn reseal_all(
    db: &Db,
    keys: std::sync::Arc<MasterKeys>,
    new: std::sync::Arc<MasterKeys>,
    redact_keys: Vec<String>,
) -> Result<usize, MasterKeyError> {
    db.write(move |tx| {
        Box::pin(async move {
            let mut count = 0;
            for stored in store::all(tx).await? {
                let place = stored.place.associated_data();
                if new.sealed_by_current(&stored.value) {
                    continue;
                }
                let plain = if super::is_sealed(&stored.value) {
                    keys.open(&stored.value, &place)
                        .map_err(|reason| open_error(&stored.place, reason))?
                } else {
                    stored.value.clone()
                };
                let sealed = new.seal(&plain, &place);
                if store::replace(tx, &stored.place, &stored.value, &sealed).await? {
                    count += 1;
                }
            }
            let ctx = crate::audit::AuditContext::system(crate::identity::SYSTEM_TENANT_ID);
            crate::audit::record(
                tx,
                &ctx,
                crate::audit::AuditEvent::new("secrets.resealed")
                    .resource("master_key", new.current().id())
                    .severity("warning")
                    .details(serde_json::json!({ "values": count })),
                &redact_keys,
            )
            .await?;
            Ok(count)
        })
    })
    .await
}

fn open_error(place: &Place, reason: OpenError) -> MasterKeyError {
    MasterKeyError::Open {
        place: place.to_string(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn the_default_file_sits_beside_the_sqlite_database() {
        let mut config = Config::defaults();
        let base = Path::new("/srv/aibos");
        assert_eq!(
            default_key_file(&config.database, base),
            Path::new("/srv/aibos/data/master.key")
        );
        config.database.url =
            crate::config::DatabaseUrl::parse("sqlite:///var/lib/aibos/k.db").unwrap();
        assert_eq!(
            default_key_file(&config.database, base),
            Path::new("/var/lib/aibos/master.key")
        );
        config.database.url = crate::config::DatabaseUrl::parse("postgres://u@h/db").unwrap();
        assert_eq!(
            default_key_file(&config.database, base),
            Path::new("/srv/aibos/data/master.key")
        );
        config.auth.master_key_file = Some(PathBuf::from("keys/mk"));
        assert_eq!(
            key_file(&config.auth, &config.database, base),
            Path::new("/srv/aibos/keys/mk")
        );
    }

    #[test]
    fn a_generated_key_file_is_private_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/master.key");
        let key = write_new_key_file(&path).unwrap();
        assert_eq!(read_key_file(&path).unwrap().id(), key.id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Never overwritten.
        assert!(write_new_key_file(&path).is_err());
        assert_eq!(read_key_file(&path).unwrap().id(), key.id());
        std::fs::write(&path, "short").unwrap();
        let err = read_key_file(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
}
