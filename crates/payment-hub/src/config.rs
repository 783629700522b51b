//! The hub's configuration: [`HubConfig`], read from the environment by
//! [`HubConfig::from_env`] (every problem listed at once, no secret ever printed).

use std::fmt;
use std::net::SocketAddr;

use aibos_cell::AssertionVerifier;

use crate::limits::{DB_CONNECTIONS_MAX, SERVICE_ACCOUNTS_MAX};

/// Where to listen.
pub const ENV_BIND: &str = "PAYMENT_HUB_BIND";
/// The hub's own database.
pub const ENV_DATABASE_URL: &str = "PAYMENT_HUB_DATABASE_URL";
/// The canon name registered with the kernel (the assertions' `aud`).
pub const ENV_CANON_NAME: &str = "AIBOS_CANON_NAME";
/// The canon's assertion secrets, comma-separated.
pub const ENV_ASSERTION_SECRETS: &str = "AIBOS_ASSERTION_SECRETS";
/// The kernel's base URL; without it nothing is published.
pub const ENV_KERNEL_URL: &str = "AIBOS_KERNEL_URL";
/// The first service account's client id.
pub const ENV_CLIENT_ID: &str = "AIBOS_CLIENT_ID";
/// The first service account's client secret.
pub const ENV_CLIENT_SECRET: &str = "AIBOS_CLIENT_SECRET";
/// More service accounts, `id:secret,id:secret` (one per tenant served).
pub const ENV_SERVICE_ACCOUNTS: &str = "PAYMENT_HUB_SERVICE_ACCOUNTS";
/// The pool size.
pub const ENV_DATABASE_MAX_CONNECTIONS: &str = "PAYMENT_HUB_DATABASE_MAX_CONNECTIONS";

/// Default listen address.
pub const DEFAULT_BIND: &str = "127.0.0.1:4000";
/// Default database: a SQLite file under `data/` (file and folder created).
pub const DEFAULT_DATABASE_URL: &str = "sqlite://data/payment-hub.db";
/// Default canon name.
pub const DEFAULT_CANON_NAME: &str = "payment-hub";
/// Default pool size.
pub const DEFAULT_DATABASE_MAX_CONNECTIONS: u32 = 8;

/// One service account of the kernel the hub publishes events as.
/// `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceAccountCredentials {
    /// The client id.
    pub client_id: String,
    /// The client secret.
    pub client_secret: String,
}

impl fmt::Debug for ServiceAccountCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccountCredentials")
            .field("client_id", &self.client_id)
            .field("client_secret", &"[REDACTED]")
            .finish()
    }
}

/// Everything the hub needs to start. `Debug` never shows a secret.
#[derive(Clone)]
pub struct HubConfig {
    /// Where to listen (port 0 picks a free port; see `Hub::local_addr`).
    pub bind: SocketAddr,
    /// `sqlite://path` or `postgres://…`.
    pub database_url: String,
    /// The canon name registered with the kernel.
    pub canon_name: String,
    /// The canon's assertion secrets (`kas_<kid>_<random>`; two during a rotation).
    pub assertion_secrets: Vec<String>,
    /// The kernel's base URL; `None`: outbox rows wait, nothing is published.
    pub kernel_url: Option<String>,
    /// The service accounts to publish as, one per tenant served.
    pub service_accounts: Vec<ServiceAccountCredentials>,
    /// Pool size (PostgreSQL; on SQLite the readers', beside one writer).
    pub database_max_connections: u32,
}

impl fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubConfig")
            .field("bind", &self.bind)
            .field("database_url", &redact_url(&self.database_url))
            .field("canon_name", &self.canon_name)
            .field("assertion_secrets", &"[REDACTED]")
            .field("kernel_url", &self.kernel_url)
            .field("service_accounts", &self.service_accounts)
            .field("database_max_connections", &self.database_max_connections)
            .finish()
    }
}

/// A URL with its password, if any, replaced by `***`.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// Every problem found in the environment. Its text lists them, one a line,
/// and never quotes a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid payment-hub configuration:\n- {}", problems.join("\n- "))]
pub struct HubConfigError {
    /// The problems, in the order the variables are read.
    pub problems: Vec<String>,
}

impl HubConfig {
    /// The defaults of every variable, with `assertion_secrets` (the one
    /// required value): what `aibos demo` starts from before setting its own
    /// `bind`, `database_url`, `kernel_url` and `service_accounts`.
    pub fn new(assertion_secrets: Vec<String>) -> HubConfig {
        HubConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 4000)),
            database_url: DEFAULT_DATABASE_URL.to_owned(),
            canon_name: DEFAULT_CANON_NAME.to_owned(),
            assertion_secrets,
            kernel_url: None,
            service_accounts: Vec::new(),
            database_max_connections: DEFAULT_DATABASE_MAX_CONNECTIONS,
        }
    }

    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<HubConfig, HubConfigError> {
        HubConfig::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the configuration through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<HubConfig, HubConfigError> {
        let get = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let mut problems = Vec::new();

        let bind_text = get(ENV_BIND).unwrap_or_else(|| DEFAULT_BIND.to_owned());
        let bind = bind_text.parse::<SocketAddr>().unwrap_or_else(|_| {
            problems.push(format!(
                "{ENV_BIND} must be an address and port such as 127.0.0.1:4000, got {bind_text:?}"
            ));
            SocketAddr::from(([127, 0, 0, 1], 0))
        });

        let database_url = get(ENV_DATABASE_URL).unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());
        if crate::db::Engine::of_url(&database_url).is_none() {
            problems.push(format!(
                "{ENV_DATABASE_URL} must start with sqlite: or postgres://, got {:?}",
                redact_url(&database_url)
            ));
        }

        let canon_name = get(ENV_CANON_NAME).unwrap_or_else(|| DEFAULT_CANON_NAME.to_owned());
        let assertion_secrets: Vec<String> = get(ENV_ASSERTION_SECRETS)
            .map(|list| {
                list.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        if assertion_secrets.is_empty() {
            problems.push(format!(
                "{ENV_ASSERTION_SECRETS} is required (comma-separated kas_ secrets)"
            ));
        } else if let Err(error) =
            AssertionVerifier::new(canon_name.clone(), assertion_secrets.clone())
        {
            // ConfigError names a bad secret by its position, never its text.
            problems.push(format!(
                "{ENV_ASSERTION_SECRETS} / {ENV_CANON_NAME}: {error}"
            ));
        }

        let kernel_url = get(ENV_KERNEL_URL);
        let mut service_accounts = Vec::new();
        match (get(ENV_CLIENT_ID), get(ENV_CLIENT_SECRET)) {
            (Some(client_id), Some(client_secret)) => {
                service_accounts.push(ServiceAccountCredentials {
                    client_id,
                    client_secret,
                })
            }
            (None, None) => {}
            (Some(_), None) => problems.push(format!(
                "{ENV_CLIENT_ID} is set but {ENV_CLIENT_SECRET} is not"
            )),
            (None, Some(_)) => problems.push(format!(
                "{ENV_CLIENT_SECRET} is set but {ENV_CLIENT_ID} is not"
            )),
        }
        if let Some(list) = get(ENV_SERVICE_ACCOUNTS) {
            for (index, entry) in list
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .enumerate()
            {
                match entry.split_once(':') {
                    Some((id, secret)) if !id.trim().is_empty() && !secret.trim().is_empty() => {
                        service_accounts.push(ServiceAccountCredentials {
                            client_id: id.trim().to_owned(),
                            client_secret: secret.trim().to_owned(),
                        });
                    }
                    _ => problems.push(format!(
                        "{ENV_SERVICE_ACCOUNTS} entry #{} (counting from 1) is not id:secret",
                        index + 1
                    )),
                }
            }
        }
        if service_accounts.len() > SERVICE_ACCOUNTS_MAX {
            problems.push(format!(
                "at most {SERVICE_ACCOUNTS_MAX} service accounts may be configured, {} were given",
                service_accounts.len()
            ));
        }
        if let Some(url) = &kernel_url
            && let Some(account) = service_accounts.first()
            && let Err(error) =
                aibos_cell::KernelClient::new(url, &account.client_id, &account.client_secret)
        {
            problems.push(format!("{ENV_KERNEL_URL}: {error}"));
        }

        let database_max_connections = match get(ENV_DATABASE_MAX_CONNECTIONS) {
            None => DEFAULT_DATABASE_MAX_CONNECTIONS,
            Some(text) => match text.parse::<u32>() {
                Ok(n) if (1..=DB_CONNECTIONS_MAX).contains(&n) => n,
                _ => {
                    problems.push(format!(
                        "{ENV_DATABASE_MAX_CONNECTIONS} must be a whole number from 1 to {DB_CONNECTIONS_MAX}, got {text:?}"
                    ));
                    DEFAULT_DATABASE_MAX_CONNECTIONS
                }
            },
        };

        if !problems.is_empty() {
            return Err(HubConfigError { problems });
        }
        Ok(HubConfig {
            bind,
            database_url,
            canon_name,
            assertion_secrets,
            kernel_url,
            service_accounts,
            database_max_connections,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const SECRET: &str = "kas_0123456789abcdef_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789";

    fn config(pairs: &[(&str, &str)]) -> Result<HubConfig, HubConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        HubConfig::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults_apply_when_only_the_secrets_are_given() {
        let config = config(&[(ENV_ASSERTION_SECRETS, SECRET)]).expect("valid");
        assert_eq!(config.bind.to_string(), DEFAULT_BIND);
        assert_eq!(config.database_url, DEFAULT_DATABASE_URL);
        assert_eq!(config.canon_name, "payment-hub");
        assert_eq!(config.database_max_connections, 8);
        assert!(config.kernel_url.is_none());
        assert!(config.service_accounts.is_empty());
    }

    #[test]
    fn new_carries_the_same_defaults_as_the_environment() {
        let from_env = config(&[(ENV_ASSERTION_SECRETS, SECRET)]).expect("valid");
        let built = HubConfig::new(vec![SECRET.to_owned()]);
        assert_eq!(format!("{built:?}"), format!("{from_env:?}"));
        assert_eq!(built.assertion_secrets, from_env.assertion_secrets);
    }

    #[test]
    fn every_problem_is_listed_and_no_secret_is_printed() {
        let error = config(&[
            (ENV_BIND, "nowhere"),
            (ENV_DATABASE_URL, "mysql://u:hunter2@db/x"),
            (ENV_CLIENT_ID, "hub"),
            (ENV_SERVICE_ACCOUNTS, "a:sas_one,broken-entry-sas_two"),
            (ENV_DATABASE_MAX_CONNECTIONS, "0"),
        ])
        .expect_err("invalid");
        assert_eq!(error.problems.len(), 6, "{error}");
        let text = error.to_string();
        for secret in ["hunter2", "sas_one", "sas_two"] {
            assert!(!text.contains(secret), "{text}");
        }
        assert!(text.contains(ENV_ASSERTION_SECRETS), "{text}");
    }

    #[test]
    fn service_accounts_come_from_both_variables_and_debug_hides_secrets() {
        let config = config(&[
            (ENV_ASSERTION_SECRETS, SECRET),
            (ENV_KERNEL_URL, "http://127.0.0.1:3001"),
            (ENV_CLIENT_ID, "hub-acme"),
            (ENV_CLIENT_SECRET, "sas_acme_secret"),
            (
                ENV_SERVICE_ACCOUNTS,
                "hub-globex:sas_globex_secret, hub-initech:sas_initech",
            ),
            (ENV_DATABASE_URL, "postgres://hub:pw@127.0.0.1/hub"),
        ])
        .expect("valid");
        let ids: Vec<&str> = config
            .service_accounts
            .iter()
            .map(|a| a.client_id.as_str())
            .collect();
        assert_eq!(ids, ["hub-acme", "hub-globex", "hub-initech"]);
        let debug = format!("{config:?}");
        for secret in [
            "sas_acme_secret",
            "sas_globex_secret",
            "sas_initech",
            "kas_",
            ":pw@",
        ] {
            assert!(!debug.contains(secret), "{debug}");
        }
    }
}
