//! The SQL over every sealed column, for the start-up sweep (seal values an
//! older kernel stored in clear, check the rest open) and for re-sealing under
//! a new master key. Domain stores seal and open their own columns; this file
//! only walks them all.

use crate::db::{Db, Tx};
use crate::{with_db, with_tx};

/// Where a sealed value lives; its associated data binds the value to that place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// `signing_keys.private_key` of key `kid`.
    SigningKey {
        /// The key id.
        kid: String,
    },
    /// `canon_assertion_secrets.secret` of a canon's `kid`.
    AssertionSecret {
        /// The canon.
        canon_id: String,
        /// The secret's id.
        kid: String,
    },
    /// `canons.tls_client_key`: a canon's private key for mutual TLS.
    CanonTlsKey {
        /// The canon.
        canon_id: String,
    },
    /// `webhook_subscriptions.secret`: a subscription's signing secret.
    WebhookSecret {
        /// The subscription.
        subscription_id: String,
    },
    /// `webhook_subscriptions.previous_secret`: the one before the last rotation.
    WebhookPreviousSecret {
        /// The subscription.
        subscription_id: String,
    },
}

impl Place {
    /// The associated data the value is sealed with.
    pub fn associated_data(&self) -> String {
        match self {
            Place::SigningKey { kid } => signing_key_place(kid),
            Place::AssertionSecret { canon_id, kid } => assertion_secret_place(canon_id, kid),
            Place::CanonTlsKey { canon_id } => canon_tls_key_place(canon_id),
            Place::WebhookSecret { subscription_id } => {
                crate::events::webhook::store::secret_place(subscription_id)
            }
            Place::WebhookPreviousSecret { subscription_id } => {
                crate::events::webhook::store::previous_secret_place(subscription_id)
            }
        }
    }
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::SigningKey { kid } => write!(f, "token-signing key {kid}"),
            Place::AssertionSecret { canon_id, kid } => {
                write!(f, "assertion secret {kid} of canon {canon_id}")
            }
            Place::CanonTlsKey { canon_id } => write!(f, "TLS client key of canon {canon_id}"),
            Place::WebhookSecret { subscription_id } => {
                write!(
                    f,
                    "signing secret of webhook subscription {subscription_id}"
                )
            }
            Place::WebhookPreviousSecret { subscription_id } => {
                write!(
                    f,
                    "previous signing secret of webhook subscription {subscription_id}"
                )
            }
        }
    }
}

/// Associated data of a token-signing key's seed.
pub fn signing_key_place(kid: &str) -> String {
    format!("signing_keys.private_key:{kid}")
}

/// Associated data of a canon's assertion secret.
pub fn assertion_secret_place(canon_id: &str, kid: &str) -> String {
    format!("canon_assertion_secrets.secret:{canon_id}:{kid}")
}

/// Associated data of a canon's TLS client key.
pub fn canon_tls_key_place(canon_id: &str) -> String {
    format!("canons.tls_client_key:{canon_id}")
}

/// One stored secret, as it is in the row (sealed or, before the upgrade, clear).
#[derive(Debug, Clone)]
pub struct StoredValue {
    /// Where it is.
    pub place: Place,
    /// The column's text.
    pub value: String,
}

/// `(kid, private_key)`, `(canon_id, kid, secret)`, `(canon_id, tls_client_key)`
/// and `(subscription_id, secret, previous_secret)` rows.
type Rows = (
    Vec<(String, String)>,
    Vec<(String, String, String)>,
    Vec<(String, String)>,
    Vec<(String, String, Option<String>)>,
);

/// Every secret the kernel stores, read inside `tx`.
pub async fn all(tx: &mut Tx) -> Result<Vec<StoredValue>, sqlx::Error> {
    let (keys, secrets, tls_keys, webhooks): Rows = with_tx!(tx, conn => {
        let keys = sqlx::query_as("SELECT kid, private_key FROM signing_keys ORDER BY kid").fetch_all(&mut *conn).await?;
        let secrets = sqlx::query_as("SELECT canon_id, kid, secret FROM canon_assertion_secrets ORDER BY canon_id, kid").fetch_all(&mut *conn).await?;
        let tls_keys = sqlx::query_as("SELECT id, tls_client_key FROM canons WHERE tls_client_key IS NOT NULL ORDER BY id").fetch_all(&mut *conn).await?;
        let webhooks = sqlx::query_as("SELECT id, secret, previous_secret FROM webhook_subscriptions ORDER BY id").fetch_all(&mut *conn).await?;
        (keys, secrets, tls_keys, webhooks)
    });
    let webhook_values = webhooks
        .into_iter()
        .flat_map(|(subscription_id, secret, previous)| {
            let previous = previous.map(|value| StoredValue {
                place: Place::WebhookPreviousSecret {
                    subscription_id: subscription_id.clone(),
                },
                value,
            });
            std::iter::once(StoredValue {
                place: Place::WebhookSecret { subscription_id },
                value: secret,
            })
            .chain(previous)
        });
    Ok(keys
        .into_iter()
        .map(|(kid, value)| StoredValue {
            place: Place::SigningKey { kid },
            value,
        })
        .chain(
            secrets
                .into_iter()
                .map(|(canon_id, kid, value)| StoredValue {
                    place: Place::AssertionSecret { canon_id, kid },
                    value,
                }),
        )
        .chain(tls_keys.into_iter().map(|(canon_id, value)| StoredValue {
            place: Place::CanonTlsKey { canon_id },
            value,
        }))
        .chain(webhook_values)
        .collect())
}

/// Replaces a stored value, only if it still is `old` (so two instances
/// sweeping at once cannot overwrite each other's seal); `false` when it was not.
pub async fn replace(
    tx: &mut Tx,
    place: &Place,
    old: &str,
    new: &str,
) -> Result<bool, sqlx::Error> {
    let n = match place {
        Place::SigningKey { kid } => with_tx!(tx, conn => {
            sqlx::query("UPDATE signing_keys SET private_key = $3 WHERE kid = $1 AND private_key = $2")
                .bind(kid).bind(old).bind(new).execute(&mut *conn).await?.rows_affected()
        }),
        Place::AssertionSecret { canon_id, kid } => with_tx!(tx, conn => {
            sqlx::query("UPDATE canon_assertion_secrets SET secret = $4 WHERE canon_id = $1 AND kid = $2 AND secret = $3")
                .bind(canon_id).bind(kid).bind(old).bind(new).execute(&mut *conn).await?.rows_affected()
        }),
        Place::CanonTlsKey { canon_id } => with_tx!(tx, conn => {
            sqlx::query("UPDATE canons SET tls_client_key = $3 WHERE id = $1 AND tls_client_key = $2")
                .bind(canon_id).bind(old).bind(new).execute(&mut *conn).await?.rows_affected()
        }),
        Place::WebhookSecret { subscription_id } => with_tx!(tx, conn => {
            sqlx::query("UPDATE webhook_subscriptions SET secret = $3 WHERE id = $1 AND secret = $2")
                .bind(subscription_id).bind(old).bind(new).execute(&mut *conn).await?.rows_affected()
        }),
        Place::WebhookPreviousSecret { subscription_id } => with_tx!(tx, conn => {
            sqlx::query("UPDATE webhook_subscriptions SET previous_secret = $3 WHERE id = $1 AND previous_secret = $2")
                .bind(subscription_id).bind(old).bind(new).execute(&mut *conn).await?.rows_affected()
        }),
    };
    Ok(n == 1)
}

/// The distinct ids of the master keys that sealed stored values (empty when
/// nothing is sealed yet: a new database, or one from before sealing).
pub async fn sealing_key_ids(db: &Db) -> Result<Vec<String>, sqlx::Error> {
    let values: Vec<String> = with_db!(db, pool => {
        sqlx::query_scalar("SELECT private_key FROM signing_keys WHERE private_key LIKE 'enc:%' \
                            UNION ALL SELECT secret FROM canon_assertion_secrets WHERE secret LIKE 'enc:%' \
                            UNION ALL SELECT tls_client_key FROM canons WHERE tls_client_key LIKE 'enc:%' \
                            UNION ALL SELECT secret FROM webhook_subscriptions WHERE secret LIKE 'enc:%' \
                            UNION ALL SELECT previous_secret FROM webhook_subscriptions WHERE previous_secret LIKE 'enc:%'")
            .fetch_all(pool).await?
    });
    let mut ids: Vec<String> = values
        .iter()
        .filter_map(|v| super::sealed_by(v))
        .map(str::to_owned)
        .collect();
    ids.sort();
    ids.dedup();
    Ok(ids)
}
