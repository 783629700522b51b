//! What a demo run generates and a later run reuses: `<data-dir>/demo.json`.
//!
//! The kernel shows a password, a canon's assertion secret, a service
//! account's client secret and a subscription's signing secret only once, when
//! they are made; the demo keeps them here so that a second run reuses the same
//! data. The file is readable by its owner only (0600), like the master-key
//! file the kernel writes beside its database, and written whole through a
//! temporary file, so a crash never leaves half of it.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file's name inside the data directory.
pub const STATE_FILE: &str = "demo.json";

/// A service account's credentials.
#[derive(Clone, Serialize, Deserialize)]
pub struct Credentials {
    pub client_id: String,
    pub client_secret: String,
}

/// The demo's webhook subscription.
#[derive(Clone, Serialize, Deserialize)]
pub struct SubscriptionState {
    pub id: String,
    /// `whsec_…`: what the receiver checks signatures with.
    pub secret: String,
}

/// One funded account of the hub.
#[derive(Clone, Serialize, Deserialize)]
pub struct AccountState {
    /// `alice`, `bob`, `carol`.
    pub name: String,
    pub id: String,
    pub currency: String,
}

/// Everything generated so far; each part is filled when the kernel made it.
#[derive(Default, Serialize, Deserialize)]
pub struct DemoState {
    pub platform_admin_password: Option<String>,
    pub tenant_admin_password: Option<String>,
    pub user_password: Option<String>,
    pub canon_secret: Option<String>,
    pub service_account: Option<Credentials>,
    pub subscription: Option<SubscriptionState>,
    #[serde(default)]
    pub accounts: Vec<AccountState>,
}

impl std::fmt::Debug for DemoState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets themselves.
        f.debug_struct("DemoState")
            .field("accounts", &self.accounts.len())
            .finish_non_exhaustive()
    }
}

/// Why the state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a demo state file ({source}); move it away or use another --data-dir")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl DemoState {
    /// The state kept in `dir`, or an empty one on a first run.
    pub fn load(dir: &Path) -> Result<DemoState, StateError> {
        let path = dir.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| StateError::Parse { path, source })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DemoState::default()),
            Err(source) => Err(StateError::Read { path, source }),
        }
    }

    /// Writes the state to `dir` (0600), replacing the previous file at once.
    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = dir.join(STATE_FILE);
        let temporary = dir.join(format!("{STATE_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            let text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temporary)?;
            file.write_all(&text)?;
            file.sync_all()?;
            std::fs::rename(&temporary, &path)
        };
        write().map_err(|source| StateError::Write {
            path: path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_state_loads_back_and_only_its_owner_can_read_it() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        assert!(DemoState::load(dir.path()).unwrap().user_password.is_none());
        let state = DemoState {
            user_password: Some("a generated password".into()),
            accounts: vec![AccountState {
                name: "alice".into(),
                id: "0197".into(),
                currency: "EUR".into(),
            }],
            ..DemoState::default()
        };
        state.save(dir.path()).unwrap();
        let loaded = DemoState::load(dir.path()).unwrap();
        assert_eq!(
            loaded.user_password.as_deref(),
            Some("a generated password")
        );
        assert_eq!(loaded.accounts[0].name, "alice");
        let mode = std::fs::metadata(dir.path().join(STATE_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            !format!("{loaded:?}").contains("generated"),
            "Debug never shows a secret"
        );
    }

    #[test]
    fn a_file_that_is_not_a_state_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), "not json").unwrap();
        let e = DemoState::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("demo.json"), "{e}");
    }
}
