//! All of the hub's SQL: accounts, payments, the ledger and the outbox. One text
//! per statement, run on either engine.

use serde::Serialize;
use time::OffsetDateTime;
use time::macros::format_description;
use uuid::Uuid;

use crate::db::{Db, Tx, with_read, with_tx};
use crate::error::{HubCode, HubError};
use crate::model::{AccountCommand, PaymentCommand};

/// The only status a stored payment has: it exists only once it completed.
pub const STATUS_COMPLETED: &str = "completed";

/// The event a committed payment publishes.
pub const PAYMENT_PROCESSED_EVENT: &str = "finance.payment.processed";

/// Now as RFC 3339 UTC with milliseconds (fixed width, so text order is time order).
pub fn now_text() -> String {
    let format =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    OffsetDateTime::now_utc()
        .format(&format)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".to_owned())
}

/// Now in epoch milliseconds.
pub fn now_millis() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// One ledger entry as answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct EntryView {
    /// The account.
    pub account_id: String,
    /// `debit` (money leaves) or `credit` (money arrives).
    pub direction: String,
    /// Minor units.
    pub amount_minor: i64,
    /// ISO 4217.
    pub currency: String,
}

/// A payment as answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PaymentView {
    /// The payment's id.
    pub transaction_id: String,
    /// `completed`.
    pub status: String,
    /// Minor units.
    pub amount_minor: i64,
    /// ISO 4217.
    pub currency: String,
    /// Debited account.
    pub payer_account: String,
    /// Credited account.
    pub payee_account: String,
    /// As sent.
    pub reference: String,
    /// The debit, then the credit.
    pub ledger_entries: Vec<EntryView>,
    /// The correlation id of the request that made it.
    pub correlation_id: String,
    /// RFC 3339.
    pub created_at: String,
}

/// An account as answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct AccountView {
    /// The account's id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// `customer` or `funding`.
    pub kind: String,
    /// ISO 4217.
    pub currency: String,
    /// Credits minus debits, in minor units.
    pub balance_minor: i64,
    /// RFC 3339.
    pub created_at: String,
}

/// One currency of the trial balance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CurrencyBalance {
    /// ISO 4217.
    pub currency: String,
    /// Sum of debits.
    pub debits_minor: i128,
    /// Sum of credits.
    pub credits_minor: i128,
    /// Sum of every account's balance.
    pub balance_sum_minor: i128,
    /// Debits equal credits and the balances sum to zero.
    pub balanced: bool,
}

/// `GET /ledger/trial-balance`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrialBalance {
    /// Every currency balanced.
    pub balanced: bool,
    /// Per currency, in alphabetical order.
    pub currencies: Vec<CurrencyBalance>,
}

/// What a payment or an opening request led to.
#[derive(Debug)]
pub enum Written<T> {
    /// Done now.
    Created(T),
    /// The same key and request were done before: here is that result.
    Replayed(T),
}

/// Who asks, from the verified assertion.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The tenant (`tid`).
    pub tenant_id: String,
    /// The user or service account (`sub`).
    pub actor: String,
    /// The request's correlation id.
    pub correlation_id: String,
}

/// What a payment transaction did: moved money, or found the key's payment.
enum PaymentTx {
    Created(PaymentView),
    Replay(String),
}

/// What the one-statement payment did.
struct Fast {
    /// The key was free and is now this payment's.
    claimed: bool,
    /// Both balances moved, both entries and the event were written.
    completed: bool,
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    id: String,
    request_fingerprint: Option<String>,
}

#[derive(sqlx::FromRow)]
struct BalanceRow {
    id: String,
    currency: String,
    balance_minor: i64,
}

#[derive(sqlx::FromRow)]
struct PaymentEntryRow {
    id: String,
    amount_minor: i64,
    currency: String,
    payer_account: String,
    payee_account: String,
    reference: String,
    status: String,
    correlation_id: String,
    created_at: String,
    entry_account: String,
    entry_direction: String,
    entry_amount_minor: i64,
    entry_currency: String,
}

const PAYMENT_BY_KEY: &str =
    "SELECT id, request_fingerprint FROM payments WHERE tenant_id = $1 AND idempotency_key = $2";
const BALANCES_OF_TWO: &str = "SELECT id, currency, balance_minor FROM accounts \
     WHERE tenant_id = $1 AND (id = $2 OR id = $3)";
const INSERT_ENTRIES: &str = "INSERT INTO ledger_entries (id, tenant_id, transaction_id, account_id, direction, amount_minor, currency, created_at) \
     VALUES ($1, $2, $3, $4, 'debit', $5, $6, $7), ($8, $2, $3, $9, 'credit', $5, $6, $7)";
// The happy path of a payment on PostgreSQL: one statement (one round trip)
// that claims the key, moves both balances, and writes both entries and the
// event. Its parameters (shared with `PAY_SQLITE`):
//   $1 id, $2 tenant, $3 key, $4 fingerprint, $5 amount, $6 currency,
//   $7 payer, $8 payee, $9 reference, $10 status, $11 correlation id,
//   $12 actor, $13 now, $14 = i64::MAX - amount (the credit cannot overflow),
//   $15 debit entry id, $16 credit entry id, $17 outbox id, $18 event type,
//   $19 event payload, $20 next attempt (epoch ms).
// All CTEs share one snapshot and all run to completion, so each step is
// gated on the previous one's output rather than on what it read:
// - `claim` first: a concurrent request with the same key waits here (before
//   taking any account lock, as the old separate INSERT did) and then claims
//   nothing; everything else depends on its row.
// - `locked` takes both account rows in the order of their ids (rows are
//   locked as the ORDER BY yields them, whether a Sort or the (tenant_id, id)
//   index orders them), so two opposite payments cannot deadlock; being locked
//   they return their latest committed balances, and the UPDATE, which only
//   runs once `ready` has read all of `locked`, finds them already held.
// - `ready` has a row only when both accounts exist in the tenant with the
//   payment's currency, the payer covers the amount and the payee stays below
//   i64::MAX; `moved` updates both rows (with the same guards) only then, and
//   the entries and the event are written only when `moved` changed both.
// The answer tells the caller which of: done (moved = 2), key taken
// (claimed = 0), or refused (claimed = 1, moved < 2: the transaction is
// rolled back after the precise refusal is read).
const PAY_POSTGRES: &str = "WITH claim AS ( \
       INSERT INTO payments (id, tenant_id, idempotency_key, request_fingerprint, amount_minor, currency, payer_account, payee_account, reference, status, correlation_id, actor, created_at) \
       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
       ON CONFLICT (tenant_id, idempotency_key) DO NOTHING RETURNING id), \
     locked AS MATERIALIZED ( \
       SELECT id, currency, balance_minor FROM accounts \
       WHERE tenant_id = $2 AND id IN ($7, $8) AND EXISTS (SELECT 1 FROM claim) \
       ORDER BY id FOR NO KEY UPDATE), \
     ready AS ( \
       SELECT 1 FROM locked HAVING count(*) = 2 \
       AND bool_and(currency = $6 AND CASE WHEN id = $7 THEN balance_minor >= $5 ELSE balance_minor <= $14 END)), \
     moved AS ( \
       UPDATE accounts SET balance_minor = CASE WHEN id = $7 THEN balance_minor - $5 ELSE balance_minor + $5 END \
       WHERE tenant_id = $2 AND id IN ($7, $8) AND currency = $6 \
       AND CASE WHEN id = $7 THEN balance_minor >= $5 ELSE balance_minor <= $14 END \
       AND EXISTS (SELECT 1 FROM ready) RETURNING id), \
     entries AS ( \
       INSERT INTO ledger_entries (id, tenant_id, transaction_id, account_id, direction, amount_minor, currency, created_at) \
       SELECT e.id, $2, $1, e.account_id, e.direction, $5, $6, $13 \
       FROM (VALUES ($15, $7, 'debit'), ($16, $8, 'credit')) AS e (id, account_id, direction) \
       WHERE (SELECT count(*) FROM moved) = 2 RETURNING id), \
     event AS ( \
       INSERT INTO outbox (id, tenant_id, event_type, subject, payload, correlation_id, created_at, attempts, next_attempt_at) \
       SELECT $17, $2, $18, $1, $19, $11, $13, 0, $20 WHERE (SELECT count(*) FROM moved) = 2 RETURNING id) \
     SELECT (SELECT count(*) FROM claim) AS claimed, (SELECT count(*) FROM moved) AS moved, \
       (SELECT count(*) FROM entries) + (SELECT count(*) FROM event) AS written";
// The same payment on SQLite, which has no data-modifying CTEs: four
// statements sent as one batch (one hand-off to sqlx's SQLite worker thread),
// with the parameters of `PAY_POSTGRES`. Each statement after the claim runs
// only when the claim's row exists (its id is new, so it exists only if this
// batch inserted it): a replay writes nothing. One UPDATE moves both
// balances or neither: its guard is an uncorrelated subquery, evaluated once
// before any row changes, that finds both accounts with the payment's
// currency, the payer covering the amount and the payee staying below
// i64::MAX. So a refusal leaves both balances as they were, and the precise
// refusal read afterwards sees them unchanged. The rows each statement changed
// are summed into one count, which tells done, key taken and refused apart; a
// refused payment is rolled back (to its savepoint) with the claim and the
// rows written. The writer task runs one body at a time, so nothing changes
// between the statements.
const PAY_SQLITE: &str = "INSERT INTO payments (id, tenant_id, idempotency_key, request_fingerprint, amount_minor, currency, payer_account, payee_account, reference, status, correlation_id, actor, created_at) \
       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
       ON CONFLICT (tenant_id, idempotency_key) DO NOTHING; \
     UPDATE accounts SET balance_minor = CASE WHEN id = $7 THEN balance_minor - $5 ELSE balance_minor + $5 END \
       WHERE tenant_id = $2 AND id IN ($7, $8) AND EXISTS (SELECT 1 FROM payments WHERE id = $1) \
       AND (SELECT count(*) FROM accounts WHERE tenant_id = $2 AND id IN ($7, $8) AND currency = $6 \
            AND CASE WHEN id = $7 THEN balance_minor >= $5 ELSE balance_minor <= $14 END) = 2; \
     INSERT INTO ledger_entries (id, tenant_id, transaction_id, account_id, direction, amount_minor, currency, created_at) \
       SELECT $15, $2, $1, $7, 'debit', $5, $6, $13 WHERE EXISTS (SELECT 1 FROM payments WHERE id = $1) \
       UNION ALL SELECT $16, $2, $1, $8, 'credit', $5, $6, $13 WHERE EXISTS (SELECT 1 FROM payments WHERE id = $1); \
     INSERT INTO outbox (id, tenant_id, event_type, subject, payload, correlation_id, created_at, attempts, next_attempt_at) \
       SELECT $17, $2, $18, $1, $19, $11, $13, 0, $20 WHERE EXISTS (SELECT 1 FROM payments WHERE id = $1)";
const PAYMENT_COLUMNS: &str = "SELECT p.id, p.amount_minor, p.currency, p.payer_account, p.payee_account, p.reference, p.status, p.correlation_id, p.created_at, \
     e.account_id AS entry_account, e.direction AS entry_direction, e.amount_minor AS entry_amount_minor, e.currency AS entry_currency \
     FROM payments p JOIN ledger_entries e ON e.tenant_id = p.tenant_id AND e.transaction_id = p.id";

/// Moves the money of `command` under `key`, or replays the payment the key
/// already made. One transaction: the key, both balances, the payment, both
/// ledger entries and the outbox row commit together or not at all.
pub async fn process_payment(
    db: &Db,
    caller: Caller,
    key: String,
    command: PaymentCommand,
) -> Result<Written<PaymentView>, HubError> {
    let fingerprint = command.fingerprint();
    let outcome = db
        .write(move |tx| {
            Box::pin(async move {
                payment_tx(tx, &caller, &key, &command, &fingerprint)
                    .await
                    .map(|o| (o, caller))
            })
        })
        .await?;
    match outcome {
        (PaymentTx::Created(view), _) => Ok(Written::Created(view)),
        (PaymentTx::Replay(id), caller) => get_payment(db, &caller.tenant_id, &id)
            .await?
            .map(Written::Replayed)
            .ok_or_else(|| {
                HubError::new(
                    HubCode::InternalError,
                    "The stored payment could not be read back.",
                )
            }),
    }
}

async fn payment_tx(
    tx: &mut Tx,
    caller: &Caller,
    key: &str,
    command: &PaymentCommand,
    fingerprint: &str,
) -> Result<PaymentTx, HubError> {
    let id = Uuid::now_v7().hyphenated().to_string();
    let now = now_text();
    let payload = serde_json::json!({
        "transaction_id": id,
        "amount_minor": command.amount_minor,
        "currency": command.currency,
        "payer_account": command.payer_account,
        "payee_account": command.payee_account,
        "reference": command.reference,
    })
    .to_string();
    // The parameters of PAY_POSTGRES and PAY_SQLITE, in their order.
    macro_rules! bind_payment {
        ($sql:expr) => {
            $sql.bind(&id)
                .bind(&caller.tenant_id)
                .bind(key)
                .bind(fingerprint)
                .bind(command.amount_minor)
                .bind(&command.currency)
                .bind(&command.payer_account)
                .bind(&command.payee_account)
                .bind(&command.reference)
                .bind(STATUS_COMPLETED)
                .bind(&caller.correlation_id)
                .bind(&caller.actor)
                .bind(&now)
                .bind(i64::MAX - command.amount_minor)
                .bind(Uuid::now_v7().hyphenated().to_string())
                .bind(Uuid::now_v7().hyphenated().to_string())
                .bind(Uuid::now_v7().hyphenated().to_string())
                .bind(PAYMENT_PROCESSED_EVENT)
                .bind(&payload)
                .bind(now_millis())
        };
    }
    let fast = match &mut *tx {
        Tx::Postgres(conn) => {
            let (claimed, moved, written): (i64, i64, i64) =
                bind_payment!(sqlx::query_as(PAY_POSTGRES))
                    .fetch_one(&mut **conn)
                    .await?;
            Fast {
                claimed: claimed == 1,
                completed: moved == 2 && written == 3,
            }
        }
        Tx::Sqlite(conn) => {
            // One result per statement, summed: the claim (1), both balances
            // (2), both entries (2) and the event (1) make 6; a key taken
            // makes 0 (nothing runs without the claim); a refusal makes 4.
            let changed = bind_payment!(sqlx::query(PAY_SQLITE))
                .execute(&mut **conn)
                .await?
                .rows_affected();
            Fast {
                claimed: changed > 0,
                completed: changed == 6,
            }
        }
    };
    if !fast.claimed {
        // The key was taken (on PostgreSQL, maybe by a request this statement
        // waited for): read its payment in a statement of its own, whose
        // snapshot sees that request's commit.
        let existing: KeyRow = with_tx!(tx, conn => sqlx::query_as(PAYMENT_BY_KEY)
            .bind(&caller.tenant_id).bind(key).fetch_one(conn).await)?;
        return if existing.request_fingerprint.as_deref() == Some(fingerprint) {
            Ok(PaymentTx::Replay(existing.id))
        } else {
            Err(HubError::new(
                HubCode::IdempotencyKeyReused,
                "This Idempotency-Key was used for another payment; use a new key for a new payment.",
            ))
        };
    }
    if !fast.completed {
        // Refused: the error rolls back the claim and whatever else was written.
        return Err(refusal(tx, caller, command).await);
    }

    let entry = |account: &str, direction: &str| EntryView {
        account_id: account.to_owned(),
        direction: direction.to_owned(),
        amount_minor: command.amount_minor,
        currency: command.currency.clone(),
    };
    Ok(PaymentTx::Created(PaymentView {
        ledger_entries: vec![
            entry(&command.payer_account, "debit"),
            entry(&command.payee_account, "credit"),
        ],
        transaction_id: id,
        status: STATUS_COMPLETED.to_owned(),
        amount_minor: command.amount_minor,
        currency: command.currency.clone(),
        payer_account: command.payer_account.clone(),
        payee_account: command.payee_account.clone(),
        reference: command.reference.clone(),
        correlation_id: caller.correlation_id.clone(),
        created_at: now,
    }))
}

/// Why a balance update changed no row: the precise refusal, read inside the
/// transaction (which is then rolled back).
async fn refusal(tx: &mut Tx, caller: &Caller, command: &PaymentCommand) -> HubError {
    let rows: Result<Vec<BalanceRow>, sqlx::Error> = with_tx!(tx, conn => sqlx::query_as(BALANCES_OF_TWO)
        .bind(&caller.tenant_id).bind(&command.payer_account).bind(&command.payee_account)
        .fetch_all(conn).await);
    let rows = match rows {
        Ok(rows) => rows,
        Err(error) => return HubError::from(error),
    };
    let find = |id: &str| rows.iter().find(|r| r.id == id);
    let (Some(payer), Some(payee)) = (find(&command.payer_account), find(&command.payee_account))
    else {
        let missing = if find(&command.payer_account).is_none() {
            "payer_account"
        } else {
            "payee_account"
        };
        return HubError::new(
            HubCode::AccountNotFound,
            format!("The {missing} does not exist."),
        );
    };
    if payer.currency != command.currency || payee.currency != command.currency {
        return HubError::new(
            HubCode::CurrencyMismatch,
            format!(
                "The payment is in {}, the payer's account in {} and the payee's in {}.",
                command.currency, payer.currency, payee.currency
            ),
        );
    }
    if payer.balance_minor < command.amount_minor {
        return HubError::new(
            HubCode::InsufficientFunds,
            "The payer's balance is lower than the amount; nothing was moved.",
        );
    }
    HubError::new(
        HubCode::BalanceLimitExceeded,
        "The payee's balance would exceed the largest balance an account can hold; nothing was moved.",
    )
}

fn assemble(rows: Vec<PaymentEntryRow>) -> Vec<PaymentView> {
    let mut views: Vec<PaymentView> = Vec::with_capacity(rows.len() / 2);
    for row in rows {
        let entry = EntryView {
            account_id: row.entry_account,
            direction: row.entry_direction,
            amount_minor: row.entry_amount_minor,
            currency: row.entry_currency,
        };
        match views.last_mut() {
            Some(view) if view.transaction_id == row.id => view.ledger_entries.push(entry),
            _ => views.push(PaymentView {
                transaction_id: row.id,
                status: row.status,
                amount_minor: row.amount_minor,
                currency: row.currency,
                payer_account: row.payer_account,
                payee_account: row.payee_account,
                reference: row.reference,
                ledger_entries: vec![entry],
                correlation_id: row.correlation_id,
                created_at: row.created_at,
            }),
        }
    }
    views
}

/// One payment of `tenant_id`, with its entries.
pub async fn get_payment(
    db: &Db,
    tenant_id: &str,
    id: &str,
) -> Result<Option<PaymentView>, HubError> {
    // 'debit' sorts after 'credit': descending puts the debit first.
    let sql =
        format!("{PAYMENT_COLUMNS} WHERE p.tenant_id = $1 AND p.id = $2 ORDER BY e.direction DESC");
    let rows: Vec<PaymentEntryRow> = with_read!(db, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(tenant_id).bind(id).fetch_all(pool).await)?;
    Ok(assemble(rows).pop())
}

/// A page of `tenant_id`'s payments, newest first, after `cursor` (an id).
pub async fn list_payments(
    db: &Db,
    tenant_id: &str,
    limit: u32,
    cursor: Option<&str>,
) -> Result<(Vec<PaymentView>, Option<String>), HubError> {
    let sql = format!(
        "{PAYMENT_COLUMNS} WHERE p.tenant_id = $1 AND ($2 = '' OR p.id < $2) ORDER BY p.id DESC, e.direction DESC LIMIT $3"
    );
    // Every payment has exactly two entries: one more payment than the page
    // tells whether there is a next one.
    let rows: Vec<PaymentEntryRow> = with_read!(db, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(tenant_id).bind(cursor.unwrap_or("")).bind((i64::from(limit) + 1) * 2)
        .fetch_all(pool).await)?;
    let mut views = assemble(rows);
    let next = if views.len() > limit as usize {
        views.truncate(limit as usize);
        views.last().map(|v| v.transaction_id.clone())
    } else {
        None
    };
    Ok((views, next))
}

const INSERT_ACCOUNT: &str = "INSERT INTO accounts (id, tenant_id, name, kind, currency, balance_minor, idempotency_key, request_fingerprint, created_at) \
     VALUES ($1, $2, $3, 'customer', $4, $5, $6, $7, $8) \
     ON CONFLICT (tenant_id, idempotency_key) DO NOTHING RETURNING id";
const ACCOUNT_BY_KEY: &str =
    "SELECT id, request_fingerprint FROM accounts WHERE tenant_id = $1 AND idempotency_key = $2";
const INSERT_FUNDING: &str = "INSERT INTO accounts (id, tenant_id, name, kind, currency, balance_minor, created_at) \
     VALUES ($1, $2, $3, 'funding', $4, 0, $5) ON CONFLICT DO NOTHING";
// $4 = i64::MIN + amount: the funding account cannot underflow.
const DEBIT_FUNDING: &str = "UPDATE accounts SET balance_minor = balance_minor - $1 \
     WHERE tenant_id = $2 AND currency = $3 AND kind = 'funding' AND balance_minor >= $4 RETURNING id";
const ACCOUNT_COLUMNS: &str =
    "SELECT id, name, kind, currency, balance_minor, created_at FROM accounts";

/// Opens a customer account; a positive opening balance is posted as a
/// transfer from the tenant's funding account of that currency.
pub async fn open_account(
    db: &Db,
    caller: Caller,
    key: Option<String>,
    command: AccountCommand,
) -> Result<Written<AccountView>, HubError> {
    let fingerprint = command.fingerprint();
    let tenant_id = caller.tenant_id.clone();
    let outcome = db
        .write(move |tx| {
            Box::pin(
                async move { open_tx(tx, &caller, key.as_deref(), &command, &fingerprint).await },
            )
        })
        .await?;
    let (id, replayed) = match outcome {
        Written::Created(id) => (id, false),
        Written::Replayed(id) => (id, true),
    };
    let view = get_account(db, &tenant_id, &id).await?.ok_or_else(|| {
        HubError::new(
            HubCode::InternalError,
            "The account could not be read back.",
        )
    })?;
    Ok(if replayed {
        Written::Replayed(view)
    } else {
        Written::Created(view)
    })
}

async fn open_tx(
    tx: &mut Tx,
    caller: &Caller,
    key: Option<&str>,
    command: &AccountCommand,
    fingerprint: &str,
) -> Result<Written<String>, HubError> {
    let id = Uuid::now_v7().hyphenated().to_string();
    let now = now_text();
    let claimed: Option<String> = with_tx!(tx, conn => sqlx::query_scalar(INSERT_ACCOUNT)
        .bind(&id).bind(&caller.tenant_id).bind(&command.name).bind(&command.currency)
        .bind(command.opening_balance_minor).bind(key).bind(key.map(|_| fingerprint)).bind(&now)
        .fetch_optional(conn).await)?;
    if claimed.is_none() {
        let existing: KeyRow = with_tx!(tx, conn => sqlx::query_as(ACCOUNT_BY_KEY)
            .bind(&caller.tenant_id).bind(key).fetch_one(conn).await)?;
        return if existing.request_fingerprint.as_deref() == Some(fingerprint) {
            Ok(Written::Replayed(existing.id))
        } else {
            Err(HubError::new(
                HubCode::IdempotencyKeyReused,
                "This Idempotency-Key was used for another account opening.",
            ))
        };
    }
    let amount = command.opening_balance_minor;
    if amount > 0 {
        with_tx!(tx, conn => sqlx::query(INSERT_FUNDING)
            .bind(Uuid::now_v7().hyphenated().to_string()).bind(&caller.tenant_id)
            .bind(format!("Funding {}", command.currency)).bind(&command.currency).bind(&now)
            .execute(conn).await.map(|r| r.rows_affected()))?;
        let funding: Option<String> = with_tx!(tx, conn => sqlx::query_scalar(DEBIT_FUNDING)
            .bind(amount).bind(&caller.tenant_id).bind(&command.currency).bind(i64::MIN + amount)
            .fetch_optional(conn).await)?;
        let Some(funding) = funding else {
            return Err(HubError::new(
                HubCode::BalanceLimitExceeded,
                "The funding account of this currency cannot post more; nothing was written.",
            ));
        };
        with_tx!(tx, conn => sqlx::query(INSERT_ENTRIES)
            .bind(Uuid::now_v7().hyphenated().to_string()).bind(&caller.tenant_id)
            .bind(Uuid::now_v7().hyphenated().to_string())
            .bind(&funding).bind(amount).bind(&command.currency).bind(&now)
            .bind(Uuid::now_v7().hyphenated().to_string()).bind(&id)
            .execute(conn).await.map(|r| r.rows_affected()))?;
    }
    Ok(Written::Created(id))
}

/// One account of `tenant_id`.
pub async fn get_account(
    db: &Db,
    tenant_id: &str,
    id: &str,
) -> Result<Option<AccountView>, HubError> {
    let sql = format!("{ACCOUNT_COLUMNS} WHERE tenant_id = $1 AND id = $2");
    Ok(
        with_read!(db, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(tenant_id).bind(id).fetch_optional(pool).await)?,
    )
}

/// A page of `tenant_id`'s accounts, newest first, after `cursor` (an id).
pub async fn list_accounts(
    db: &Db,
    tenant_id: &str,
    limit: u32,
    cursor: Option<&str>,
) -> Result<(Vec<AccountView>, Option<String>), HubError> {
    let sql = format!(
        "{ACCOUNT_COLUMNS} WHERE tenant_id = $1 AND ($2 = '' OR id < $2) ORDER BY id DESC LIMIT $3"
    );
    let mut rows: Vec<AccountView> = with_read!(db, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(tenant_id).bind(cursor.unwrap_or("")).bind(i64::from(limit) + 1)
        .fetch_all(pool).await)?;
    let next = if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        rows.last().map(|a| a.id.clone())
    } else {
        None
    };
    Ok((rows, next))
}

// One statement, so both sums come from one snapshot: a payment committing
// between two queries cannot make a balanced ledger look unbalanced.
/// Each amount split into `amount / 10^9` and `amount % 10^9` (exact, with
/// truncating division: `x = high * 10^9 + low`), summed apart: the sums of a
/// tenant's whole ledger can pass 64 bits, which SQLite's `SUM` refuses with an
/// error, while each partial sum stays far inside them (fewer than 10^9 rows).
/// They are joined in 128 bits in Rust.
const TRIAL_BALANCE: &str = "SELECT currency, \
     CAST(SUM(debit / 1000000000) AS BIGINT), CAST(SUM(debit % 1000000000) AS BIGINT), \
     CAST(SUM(credit / 1000000000) AS BIGINT), CAST(SUM(credit % 1000000000) AS BIGINT), \
     CAST(SUM(balance / 1000000000) AS BIGINT), CAST(SUM(balance % 1000000000) AS BIGINT) FROM ( \
     SELECT currency, CASE WHEN direction = 'debit' THEN amount_minor ELSE 0 END AS debit, \
            CASE WHEN direction = 'credit' THEN amount_minor ELSE 0 END AS credit, 0 AS balance \
     FROM ledger_entries WHERE tenant_id = $1 \
     UNION ALL \
     SELECT currency, 0 AS debit, 0 AS credit, balance_minor AS balance FROM accounts WHERE tenant_id = $1 \
     ) t GROUP BY currency ORDER BY currency";

/// `(currency, debits high, debits low, credits high, credits low, balances high, balances low)`.
type SumsRow = (String, i64, i64, i64, i64, i64, i64);

/// `high * 10^9 + low`, in 128 bits.
fn joined(high: i64, low: i64) -> i128 {
    i128::from(high) * 1_000_000_000 + i128::from(low)
}

/// The tenant's trial balance per currency.
pub async fn trial_balance(db: &Db, tenant_id: &str) -> Result<TrialBalance, HubError> {
    let rows: Vec<SumsRow> = with_read!(db, pool => sqlx::query_as(TRIAL_BALANCE)
        .bind(tenant_id).fetch_all(pool).await)?;
    let currencies: Vec<CurrencyBalance> = rows
        .into_iter()
        .map(|(currency, dh, dl, ch, cl, bh, bl)| {
            let (debits_minor, credits_minor, balance_sum_minor) =
                (joined(dh, dl), joined(ch, cl), joined(bh, bl));
            CurrencyBalance {
                currency,
                balanced: debits_minor == credits_minor && balance_sum_minor == 0,
                debits_minor,
                credits_minor,
                balance_sum_minor,
            }
        })
        .collect();
    Ok(TrialBalance {
        balanced: currencies.iter().all(|c| c.balanced),
        currencies,
    })
}

#[cfg(test)]
mod sum_tests {
    use super::joined;

    #[test]
    fn split_sums_join_back_exactly_beyond_64_bits() {
        let amounts = [i64::MAX, i64::MAX, -5, 1_999_999_999, i64::MIN + 1];
        let (mut high, mut low) = (0i64, 0i64);
        for a in amounts {
            high += a / 1_000_000_000;
            low += a % 1_000_000_000;
        }
        let exact: i128 = amounts.iter().map(|a| i128::from(*a)).sum();
        assert_eq!(joined(high, low), exact);
        assert!(
            exact > i128::from(i64::MAX),
            "the case SQLite's SUM refuses"
        );
    }
}

/// An outbox row due for publishing.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    /// Also the publish's Idempotency-Key.
    pub id: String,
    /// Whose service account publishes it.
    pub tenant_id: String,
    /// `finance.payment.processed`.
    pub event_type: String,
    /// The payment's id.
    pub subject: String,
    /// JSON text.
    pub payload: String,
    /// The request's correlation id.
    pub correlation_id: String,
    /// Failed attempts so far.
    pub attempts: i32,
}

/// Up to `limit` unpublished rows due at `now_ms`, oldest first.
pub async fn due_outbox(db: &Db, now_ms: i64, limit: i64) -> Result<Vec<OutboxRow>, HubError> {
    Ok(with_read!(db, pool => sqlx::query_as(
        "SELECT id, tenant_id, event_type, subject, payload, correlation_id, attempts FROM outbox \
         WHERE published_at IS NULL AND next_attempt_at <= $1 ORDER BY next_attempt_at, id LIMIT $2")
        .bind(now_ms).bind(limit).fetch_all(pool).await)?)
}

/// What became of one row's publish.
#[derive(Debug, Clone)]
pub enum OutboxResult {
    /// Published (or already recorded by the kernel under its key).
    Published(String),
    /// Not published: try again at `next_attempt_ms`.
    Failed {
        /// The row.
        id: String,
        /// When to try again.
        next_attempt_ms: i64,
        /// Why, for operators (never a secret).
        error: String,
    },
}

/// Records a pass's results in one transaction (one fsync on SQLite): the
/// published rows in one statement, each failed row in its own (rare).
pub async fn record_outbox(db: &Db, results: Vec<OutboxResult>) -> Result<(), HubError> {
    if results.is_empty() {
        return Ok(());
    }
    db.write(move |tx| {
        Box::pin(async move {
            let now = now_text();
            let mut published = Vec::with_capacity(results.len());
            for result in &results {
                match result {
                    OutboxResult::Published(id) => published.push(id.as_str()),
                    OutboxResult::Failed { id, next_attempt_ms, error } => {
                        with_tx!(tx, conn => sqlx::query(
                            "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = $1, last_error = $2 WHERE id = $3")
                            .bind(next_attempt_ms).bind(error).bind(id).execute(conn).await.map(|r| r.rows_affected()))?;
                    }
                }
            }
            // A pass holds at most OUTBOX_BATCH_ROWS_MAX rows: far below either
            // engine's limit on bound parameters.
            if !published.is_empty() {
                let placeholders: Vec<String> = (0..published.len()).map(|i| format!("${}", i + 2)).collect();
                // Only generated placeholders go into the text; the ids are bound.
                let sql = format!(
                    "UPDATE outbox SET published_at = $1, attempts = attempts + 1, last_error = NULL WHERE id IN ({})",
                    placeholders.join(", ")
                );
                with_tx!(tx, conn => {
                    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql.clone())).bind(&now);
                    for id in &published {
                        query = query.bind(*id);
                    }
                    query.execute(conn).await.map(|r| r.rows_affected())
                })?;
            }
            Ok::<(), HubError>(())
        })
    })
    .await
}
