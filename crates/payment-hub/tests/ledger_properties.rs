//! Ledger properties under random sequences of openings, payments (some
//! concurrent), replays, reused keys and ledger outages, on a real hub.
//!
//! After every case: the trial balance balances per currency, no customer
//! balance is negative, each idempotency key moved money at most once (one
//! payment, two entries), and the customers' money changed only by openings.
//! Sequential steps are also checked against a model of the balances.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::{Engine, TestHub};
use proptest::prelude::*;
use serde_json::json;

const CURRENCIES: [&str; 2] = ["EUR", "USD"];
/// Few keys, so that replays and reuses happen often.
const KEYS: usize = 8;

#[derive(Debug, Clone)]
struct Pay {
    payer: usize,
    payee: usize,
    amount: i64,
    currency: usize,
    key: usize,
}

#[derive(Debug, Clone)]
enum Op {
    Open { currency: usize, opening: i64 },
    Pay(Pay),
    Concurrent(Vec<Pay>),
    LedgerOutage(Pay),
}

fn pay() -> impl Strategy<Value = Pay> {
    (
        0..6usize,
        0..6usize,
        1..600i64,
        prop::sample::select(vec![0usize, 0, 0, 1]),
        0..KEYS,
    )
        .prop_map(|(payer, payee, amount, currency, key)| Pay {
            payer,
            payee,
            amount,
            currency,
            key,
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..2usize, 0..1_000i64).prop_map(|(currency, opening)| Op::Open { currency, opening }),
        6 => pay().prop_map(Op::Pay),
        2 => prop::collection::vec(pay(), 2..8).prop_map(Op::Concurrent),
        1 => pay().prop_map(Op::LedgerOutage),
    ]
}

struct Account {
    id: String,
    currency: usize,
    balance: i64,
}

struct Model {
    tenant: String,
    accounts: Vec<Account>,
    /// Key -> (the request that spent it, its payment id).
    spent: HashMap<usize, (String, String)>,
    /// Sum of openings per currency.
    funded: [i64; 2],
}

impl Model {
    fn body(&self, pay: &Pay) -> serde_json::Value {
        let n = self.accounts.len();
        json!({
            "amount_minor": pay.amount,
            "currency": CURRENCIES[pay.currency],
            "payer_account": self.accounts[pay.payer % n].id,
            "payee_account": self.accounts[pay.payee % n].id,
            "reference": format!("prop {}", pay.key),
        })
    }
}

async fn open(hub: &TestHub, model: &mut Model, currency: usize, opening: i64) {
    let id = hub
        .open_account(&model.tenant, "prop", CURRENCIES[currency], opening)
        .await;
    model.accounts.push(Account {
        id,
        currency,
        balance: opening,
    });
    model.funded[currency] += opening;
}

async fn sequential(hub: &TestHub, model: &mut Model, pay: &Pay) {
    let body = model.body(pay);
    let text = body.to_string();
    let key = format!("key-{}", pay.key);
    let answer = hub
        .post(&model.tenant, "/payments/process", body, Some(&key))
        .await;
    let n = model.accounts.len();
    let (payer, payee) = (pay.payer % n, pay.payee % n);
    if payer == payee {
        assert_eq!(answer.status, 400, "{}", answer.body);
        return;
    }
    if let Some((spent_body, id)) = model.spent.get(&pay.key) {
        if *spent_body == text {
            assert_eq!(answer.status, 201, "{}", answer.body);
            assert_eq!(answer.header("idempotent-replayed"), Some("true"));
            assert_eq!(answer.body["transaction_id"], id.as_str());
        } else {
            assert_eq!(
                answer.body["code"], "IDEMPOTENCY_KEY_REUSED",
                "{}",
                answer.body
            );
        }
        return;
    }
    let (from, to) = (&model.accounts[payer], &model.accounts[payee]);
    if from.currency != pay.currency || to.currency != pay.currency {
        assert_eq!(answer.body["code"], "CURRENCY_MISMATCH", "{}", answer.body);
    } else if from.balance < pay.amount {
        assert_eq!(answer.body["code"], "INSUFFICIENT_FUNDS", "{}", answer.body);
    } else {
        assert_eq!(answer.status, 201, "{}", answer.body);
        assert_eq!(answer.header("idempotent-replayed"), None);
        model.accounts[payer].balance -= pay.amount;
        model.accounts[payee].balance += pay.amount;
        let id = answer.body["transaction_id"]
            .as_str()
            .expect("id")
            .to_owned();
        model.spent.insert(pay.key, (text, id));
    }
}

async fn concurrent(hub: &Arc<TestHub>, model: &mut Model, pays: &[Pay]) {
    let mut tasks = Vec::new();
    for pay in pays {
        let (hub, tenant, body) = (hub.clone(), model.tenant.clone(), model.body(pay));
        let key = format!("key-{}", pay.key);
        let text = body.to_string();
        let task = tokio::spawn(async move {
            hub.post(&tenant, "/payments/process", body, Some(&key))
                .await
        });
        tasks.push((pay.key, text, task));
    }
    let mut fresh: HashMap<usize, usize> = HashMap::new();
    for (key, text, task) in tasks {
        let answer = task.await.expect("task");
        assert!(answer.status < 500, "{}", answer.body);
        if answer.status == 201 {
            let id = answer.body["transaction_id"]
                .as_str()
                .expect("id")
                .to_owned();
            if answer.header("idempotent-replayed").is_none() {
                *fresh.entry(key).or_default() += 1;
                model.spent.insert(key, (text, id));
            } else {
                let (_, spent_id) = model.spent.get(&key).cloned().unwrap_or_default();
                // Replayed within the group or of an earlier step: the key's one payment.
                if !spent_id.is_empty() {
                    assert_eq!(spent_id, id);
                }
            }
        }
    }
    assert!(
        fresh.values().all(|n| *n == 1),
        "a key moved money twice: {fresh:?}"
    );
    // Interleaving decides which ones went through: read the balances back.
    for account in &mut model.accounts {
        account.balance = hub.balance(&model.tenant, &account.id).await;
    }
}

async fn outage(hub: &TestHub, model: &mut Model, pay: &Pay) {
    let t = model.tenant.clone();
    assert_eq!(
        hub.post(&t, "/chaos/fail/ledger", json!({}), None)
            .await
            .status,
        200
    );
    let answer = hub
        .post(
            &t,
            "/payments/process",
            model.body(pay),
            Some(&format!("key-{}", pay.key)),
        )
        .await;
    assert_eq!(answer.body["code"], "LEDGER_DOWN", "{}", answer.body);
    assert_eq!(
        hub.post(&t, "/chaos/recover/ledger", json!({}), None)
            .await
            .status,
        200
    );
}

async fn check_invariants(hub: &TestHub, model: &Model) {
    let t = &model.tenant;
    let trial = hub.trial_balance(t).await;
    assert_eq!(trial["balanced"], true, "{trial}");
    let mut customer_sum = [0i64; 2];
    for account in &model.accounts {
        let balance = hub.balance(t, &account.id).await;
        assert!(balance >= 0, "a customer balance went negative: {balance}");
        assert_eq!(balance, account.balance, "the model and the ledger agree");
        customer_sum[account.currency] += balance;
    }
    assert_eq!(
        customer_sum, model.funded,
        "customers' money changed only by openings"
    );
    let payments = hub.db.scalar("SELECT COUNT(*) FROM payments").await;
    assert_eq!(
        payments,
        model.spent.len() as i64,
        "one payment per spent key"
    );
    let odd = hub
        .db
        .scalar(
            "SELECT COUNT(*) FROM (SELECT p.id FROM payments p LEFT JOIN ledger_entries e ON e.transaction_id = p.id \
             GROUP BY p.id HAVING COUNT(e.id) <> 2) t",
        )
        .await;
    assert_eq!(odd, 0, "every payment has exactly two entries");
    assert_eq!(
        hub.db.scalar("SELECT COUNT(*) FROM outbox").await,
        payments,
        "one event per payment"
    );
}

fn run_case(engine: Engine, ops: Vec<Op>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let Some(hub) = TestHub::spawn(engine).await else {
            return;
        };
        let hub = Arc::new(hub);
        let mut model = Model {
            tenant: hub.tenant.clone(),
            accounts: Vec::new(),
            spent: HashMap::new(),
            funded: [0, 0],
        };
        open(&hub, &mut model, 0, 1_000).await;
        open(&hub, &mut model, 0, 0).await;
        for op in &ops {
            match op {
                Op::Open { currency, opening } => open(&hub, &mut model, *currency, *opening).await,
                Op::Pay(pay) => sequential(&hub, &mut model, pay).await,
                Op::Concurrent(pays) => concurrent(&hub, &mut model, pays).await,
                Op::LedgerOutage(pay) => outage(&hub, &mut model, pay).await,
            }
        }
        check_invariants(&hub, &model).await;
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_ledger_stays_balanced_on_sqlite(ops in prop::collection::vec(op(), 1..25)) {
        run_case(Engine::Sqlite, ops);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_ledger_stays_balanced_on_postgres(ops in prop::collection::vec(op(), 1..25)) {
        run_case(Engine::Postgres, ops);
    }
}
