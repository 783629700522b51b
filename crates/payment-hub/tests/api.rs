//! The hub over HTTP, on SQLite and (with `AIBOS_TEST_DATABASE_URL`) PostgreSQL.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use common::{Engine, TestHub, new_secret};
use payment_hub::ServiceAccountCredentials;
use reqwest::Method;
use serde_json::{Value, json};
use uuid::Uuid;

on_both_engines!(
    probes_answer_and_health_reports_failed_cells,
    a_payment_moves_money_once_with_balanced_entries,
    refused_payments_move_nothing,
    a_credit_beyond_the_largest_balance_is_refused_and_moves_nothing,
    calls_without_a_verified_assertion_are_refused,
    chaos_switches_refuse_and_recover,
    fifty_concurrent_payments_with_one_key_move_money_once,
    opposite_concurrent_payments_do_not_deadlock,
    bad_input_gets_problem_answers,
    lists_page_newest_first,
    account_openings_honor_idempotency_keys,
    the_outbox_delivers_after_the_kernel_comes_back,
    clients_hanging_up_mid_payment_leave_nothing_half_written,
);

async fn probes_answer_and_health_reports_failed_cells(engine: Engine) {
    let Some(hub) = TestHub::spawn(engine).await else {
        return;
    };
    let ping = hub.http.get(hub.url("/ping")).send().await.expect("ping");
    assert_eq!(ping.status(), 200);
    assert_eq!(
        ping.json::<Value>().await.expect("json"),
        json!({"message": "pong"})
    );

    let health = hub
        .http
        .get(hub.url("/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), 200);
    assert_eq!(
        health.json::<Value>().await.expect("json"),
        json!({"service": "payment-hub", "status": "healthy", "cells": {
            "gateway": {"status": "healthy"}, "processor": {"status": "healthy"}, "ledger": {"status": "healthy"}}})
    );

    let failed = hub
        .post(&hub.tenant, "/chaos/fail/processor", json!({}), None)
        .await;
    assert_eq!(failed.status, 200, "{}", failed.body);
    assert_eq!(
        failed.body,
        json!({"cell": "processor", "status": "failed"})
    );
    // The failing tenant sees its processor failed; the kernel's plain probe
    // and every other tenant see the hub healthy: one tenant's switch never
    // stops the others' payments, nor the kernel's routing to the hub.
    let health = hub.get(&hub.tenant, "/health").await;
    assert_eq!(health.status, 503, "{}", health.body);
    assert_eq!(health.body["status"], "degraded");
    assert_eq!(
        health.body["cells"]["processor"],
        json!({"status": "failed"})
    );
    assert_eq!(health.body["cells"]["ledger"], json!({"status": "healthy"}));
    let probe = hub
        .http
        .get(hub.url("/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(probe.status(), 200);
    let other = Uuid::now_v7().to_string();
    assert_eq!(hub.get(&other, "/health").await.status, 200);

    let recovered = hub
        .post(&hub.tenant, "/chaos/recover/processor", json!({}), None)
        .await;
    assert_eq!(
        recovered.body,
        json!({"cell": "processor", "status": "healthy"})
    );
    let health = hub.get(&hub.tenant, "/health").await;
    assert_eq!(health.status, 200, "{}", health.body);
    hub.stop().await;
}

async fn a_payment_moves_money_once_with_balanced_entries(engine: Engine) {
    let Some(hub) = TestHub::spawn(engine).await else {
        return;
    };
    let t = hub.tenant.clone();
    let alice = hub.open_account(&t, "Alice", "EUR", 10_000).await;
    let bob = hub.open_account(&t, "Bob", "EUR", 0).await;
    let body = json!({"amount_minor": 2_500, "currency": "EUR", "payer_account": alice, "payee_account": bob, "reference": "Invoice 42"});

    let paid = hub
        .post(&t, "/payments/process", body.clone(), Some("pay-1"))
        .await;
    assert_eq!(paid.status, 201, "{}", paid.body);
    let id = paid.body["transaction_id"].as_str().expect("id").to_owned();
    assert_eq!(
        paid.header("location"),
        Some(format!("/payments/status/{id}").as_str())
    );
    assert_eq!(paid.header("idempotent-replayed"), None);
    assert_eq!(paid.body["status"], "completed");
    assert_eq!(paid.body["amount_minor"], 2_500);
    assert_eq!(paid.body["reference"], "Invoice 42");
    assert_eq!(
        paid.body["ledger_entries"],
        json!([
            {"account_id": alice, "direction": "debit", "amount_minor": 2_500, "currency": "EUR"},
            {"account_id": bob, "direction": "credit", "amount_minor": 2_500, "currency": "EUR"},
        ])
    );
    assert_eq!(
        paid.header("x-correlation-id"),
        paid.body["correlation_id"].as_str()
    );
    assert_eq!(hub.balance(&t, &alice).await, 7_500);
    assert_eq!(hub.balance(&t, &bob).await, 2_500);

    // The same key and body: the stored payment, and no money moves.
    let replay = hub
        .post(&t, "/payments/process", body.clone(), Some("pay-1"))
        .await;
    assert_eq!(replay.status, 201, "{}", replay.body);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.body["transaction_id"], id.as_str());
    assert_eq!(replay.body["ledger_entries"], paid.body["ledger_entries"]);
    assert_eq!(
        replay.body["correlation_id"], paid.body["correlation_id"],
        "the first request's"
    );
    assert_eq!(hub.balance(&t, &alice).await, 7_500);

    // The same key with another body.
    let mut other = body.clone();
    other["amount_minor"] = json!(2_501);
    hub.post(&t, "/payments/process", other, Some("pay-1"))
        .await
        .problem(422, "IDEMPOTENCY_KEY_REUSED");
    // No key at all.
    let missing = hub.post(&t, "/payments/process", body.clone(), None).await;
    missing.problem(400, "IDEMPOTENCY_KEY_REQUIRED");
    assert!(missing.body["correlation_id"].is_string());

    let status = hub.get(&t, &format!("/payments/status/{id}")).await;
    assert_eq!(status.status, 200);
    assert_eq!(status.body, paid.body);
    hub.get(&t, &format!("/payments/status/{}", Uuid::now_v7()))
        .await
        .problem(404, "PAYMENT_NOT_FOUND");
    // Another tenant sees nothing of it.
    let stranger = Uuid::now_v7().to_string();
    hub.get(&stranger, &format!("/payments/status/{id}"))
        .await
        .problem(404, "PAYMENT_NOT_FOUND");

    let trial = hub.trial_balance(&t).await;
    assert_eq!(
        trial,
        json!({"balanced": true, "currencies": [
            {"currency": "EUR", "debits_minor": 12_500, "credits_minor": 12_500, "balance_sum_minor": 0, "balanced": true}
        ]})
    );
    assert_eq!(hub.db.scalar("SELECT COUNT(*) FROM payments").await, 1);
    assert_eq!(
        hub.db.scalar("SELECT COUNT(*) FROM outbox").await,
        1,
        "one event for one payment"
    );
    hub.stop().await;
}

async fn refused_payments_move_nothing(engine: Engine) {
    let Some(hub) = TestHub::spawn(engine).await else {
        return;
    };
    let t = hub.tenant.clone();
    let alice = hub.open_account(&t, "Alice", "EUR", 1_000).await;
    let bob = hub.open_account(&t, "Bob", "EUR", 0).await;
    let dollars = hub.open_account(&t, "Carol", "USD", 1_000).await;
    let other_tenant = Uuid::now_v7().to_string();
    let foreign = hub
        .open_account(&other_tenant, "Mallory", "EUR", 1_000)
        .await;

    let too_much = hub.pay(&t, &alice, &bob, 1_001, "EUR", "k-funds").await;
    too_much.problem(422, "INSUFFICIENT_FUNDS");
    hub.pay(&t, &alice, &dollars, 10, "EUR", "k-cur-1")
        .await
        .problem(422, "CURRENCY_MISMATCH");
    hub.pay(&t, &alice, &bob, 10, "USD", "k-cur-2")
        .await
        .problem(422, "CURRENCY_MISMATCH");
    // Another tenant's account answers exactly like a missing one.
    let theirs = hub.pay(&t, &foreign, &bob, 10, "EUR", "k-foreign-1").await;
    theirs.problem(404, "ACCOUNT_NOT_FOUND");
    let to_theirs = hub
        .pay(&t, &alice, &foreign, 10, "EUR", "k-foreign-2")
        .await;
    to_theirs.problem(404, "ACCOUNT_NOT_FOUND");
    let missing = Uuid::now_v7().to_string();
    let nowhere = hub.pay(&t, &alice, &missing, 10, "EUR", "k-missing").await;
    nowhere.problem(404, "ACCOUNT_NOT_FOUND");
    assert_eq!(to_theirs.body["detail"], nowhere.body["detail"]);
    hub.get(&t, &format!("/ledger/accounts/{foreign}"))
        .await
        .problem(404, "ACCOUNT_NOT_FOUND");

    assert_eq!(hub.balance(&t, &alice).await, 1_000);
    assert_eq!(hub.balance(&t, &bob).await, 0);
    assert_eq!(hub.balance(&other_tenant, &foreign).await, 1_000);
    assert_eq!(hub.db.scalar("SELECT COUNT(*) FROM payments").await, 0);
    assert_eq!(hub.db.scalar("SELECT COUNT(*) FROM outbox").await, 0);
    // Only the three openings with money: two entries each.
    assert_eq!(
        hub.db.scalar("SELECT COUNT(*) FROM ledger_entries").await,
        6
    );
    // A refused key is not spent: the same key works once the payment is valid.
    let ok = hub.pay(&t, &alice, &bob, 1_000, "EUR", "k-funds").await;
    assert_eq!(ok.status, 201, "{}", ok.body);
    assert_eq!(hub.balance(&t, &alice).await, 0);
    hub.stop().await;
}

async fn a_credit_beyond_the_largest_balance_is_refused_and_moves_nothing(engine: Engine) {
    let Some(hub) = TestHub::spawn(engine).await else {
        return;
    };
    // Both orders of the two account ids (balances are changed in id order,
    // and the refusal must name the payee's limit either way).
    for payer_first in [false, true] {
        let t = Uuid::now_v7().to_string();
        // The tenant's funding account can issue i64::MAX + 1 in all (down to
        // i64::MIN): nine openings of the largest amount and one of the rest.
        let largest = payment_hub::limits::AMOUNT_MINOR_MAX;
        let rest = i64::MAX - 9 * largest + 1;
        let (last, bob) = if payer_first {
            let last = hub.open_account(&t, "Last", "EUR", rest).await;
            (last, hub.open_account(&t, "Bob", "EUR", largest).await)
        } else {
            let bob = hub.open_account(&t, "Bob", "EUR", largest).await;
            (hub.open_account(&t, "Last", "EUR", rest).await, bob)
        };
        assert_eq!(last < bob, payer_first);
        for i in 0..8 {
            let payer = hub
                .open_account(&t, &format!("payer {i}"), "EUR", largest)
                .await;
            let paid = hub
                .pay(&t, &payer, &bob, largest, "EUR", &format!("k-{i}"))
                .await;
            assert_eq!(paid.status, 201, "{}", paid.body);
        }
        assert_eq!(hub.balance(&t, &bob).await, 9 * largest);
        let payments = hub.db.scalar("SELECT COUNT(*) FROM payments").await;
        let entries = hub.db.scalar("SELECT COUNT(*) FROM ledger_entries").await;
        let events = hub.db.scalar("SELECT COUNT(*) FROM outbox").await;

        // Bob would hold i64::MAX + 1.
        hub.pay(&t, &last, &bob, rest, "EUR", "k-over")
            .await
            .problem(422, "BALANCE_LIMIT_EXCEEDED");
        assert_eq!(hub.balance(&t, &bob).await, 9 * largest);
        assert_eq!(hub.balance(&t, &last).await, rest);
        assert_eq!(
            hub.db.scalar("SELECT COUNT(*) FROM payments").await,
            payments
        );
        assert_eq!(
            hub.db.scalar("SELECT COUNT(*) FROM ledger_entries").await,
            entries
        );
        assert_eq!(hub.db.scalar("SELECT COUNT(*) FROM outbox").await, events);
        // A refused key is not spent, and one unit less fits exactly: Bob
        // holds i64::MAX.
        let fits = hub.pay(&t, &last, &bob, rest - 1, "EUR", "k-over").await;
        assert_eq!(fits.status, 201, "{}", fits.body);
        assert_eq!(hub.balance(&t, &bob).await, i64::MAX);
        assert_eq!(hub.balance(&t, &last).await, 1);
        // The ledger's sums now pass 64 bits (SQLite's SUM would refuse them):
        // summed exactly, and balanced.
        let trial = hub.get(&t, "/ledger/trial-balance").await;
        assert_eq!(trial.status, 200, "{}", trial.body);
        assert_eq!(trial.body["balanced"], true, "{}", trial.body);
        assert!(
            trial.body["currencies"][0]["debits_minor"]
                .as_f64()
                .unwrap()
                > i64::MAX as f64,
            "{}",
            trial.body
        );
    }
    hub.stop().await;
}

async fn calls_without_a_verified_assertion_are_refused(engine: Engine) {
    let Some(hub) = TestHub::spawn(engine).await else {
        return;
    };
    let t = hub.tenant.clone();
    let mut unsigned = hub.call(&t, Method::GET, "/ledger/trial-balance");
    unsigned.sign = false;
    let answer = hub.send(unsigned).await;
    assert_eq!(answer.status, 401);
    assert_eq!(answer.body["code"], "UNAUTHORIZED");

    let forged_secret = new_secret();
    let mut forged = hub.call(&t, Method::GET, "/ledger/trial-balance");
    forged.secret = Some(&forged_secret);
    assert_eq!(hub.send(forged).await.status, 401);

    // Signed for another path: refused on this one.
    let cid = Uuid::now_v7().to_string();
    let token = common::sign(
        &hub.secret,
        &t,
        common::TEST_USER,
        &cid,
        "GET",
        "/ledger/accounts",
    );
    let answer = hub
        .http
        .get(hub.url("/ledger/trial-balance"))
        .header("x-kernel-assertion", token)
        .header("x-correlation-id", &cid)
        .send()
        .await
        .expect("answer");
    assert_eq!(answer.status(), 401);
    assert_eq!(
        answer
            .headers()
            .get("x-correlation-id")
            .and_then(|v| v.to_str().ok()),
        Some(cid.as_str())
    );
    hub.stop().await;
}

async fn chaos_switches_refuse_and_recover(engine: Engine) {
    let Some(hub) = TestHub::spawn(engine).await else {
        return;
    };
    let t = hub.tenant.clone();
    let alice = hub.open_account(&t, "Alice", "EUR", 1_000).await;
    let bob = hub.open_account(&t, "Bob", "EUR", 0).await;

    hub.post(&t, "/chaos/fail/ledger", json!({}), None).await;
    hub.pay(&t, &alice, &bob, 100, "EUR", "chaos-1")
        .await
        .problem(503, "LEDGER_DOWN");
    hub.post(
        &t,
        "/ledger/accounts",
        json!({"name": "X", "currency": "EUR"}),
        None,
    )
    .await
    .problem(503, "LEDGER_DOWN");
    assert_eq!(
        hub.db.scalar("SELECT COUNT(*) FROM payments").await,
        0,
        "nothing written"
    );
    assert_eq!(hub.db.scalar("SELECT COUNT(*) FROM outbox").await, 0);
    // Another tenant of the same hub pays on: the switches are per tenant.
    let other = Uuid::now_v7().to_string();
    let carol = hub.open_account(&other, "Carol", "EUR", 500).await;
    let dave = hub.open_account(&other, "Dave", "EUR", 0).await;
    let unaffected = hub.pay(&other, &carol, &dave, 100, "EUR", "other-1").await;
    assert_eq!(unaffected.status, 201, "{}", unaffected.body);
    hub.post(&t, "/chaos/recover/ledger", json!({}), None).await;
    let paid = hub.pay(&t, &alice, &bob, 100, "EUR", "chaos-1").await;
    assert_eq!(
        paid.status, 201,
        "the same key succeeds after recovery: {}",
        paid.body
    );
    assert_eq!(hub.balance(&t, &bob).await, 100);

    hub.post(&t, "/chaos/fail/processor", json!({}), None).await;
    hub.pay(&t, &alice, &bob, 100, "EUR", "chaos-2")
        .await
        .problem(503, "PROCESSOR_DOWN");
    hub.post(&t, "/chaos/recover/processor", json!({}), None)
        .await;

    let down = hub.post(&t, "/chaos/fail/gateway", json!({}), None).await;
    assert_eq!(down.status, 200);
    hub.pay(&t, &alice, &bob, 100, "EUR", "chaos-3")
        .await
        .problem(503, "GATEWAY_DOWN");
    hub.get(&t, &format!("/ledger/accounts/{alice}"))
        .await
        .problem(503, "GATEWAY_DOWN");
    hub.get(&t, "/payments").await.problem(503, "GATEWAY_DOWN");
    // The probes and the chaos switches stay reachable.
    assert_eq!(
        hub.http
            .get(hub.url("/ping"))
            .send()
            .await
            .expect("ping")
            .status(),
        200
    );
    let up = hub
        .post(&t, "/chaos/recover/gateway", json!({}), None)
        .await;
    assert_eq!(up.body, json!({"cell": "gateway", "status": "healthy"}));
    assert_eq!(
        hub.pay(&t, &alice, &bob, 100, "EUR", "chaos-3")
            .await
            .status,
        201
    );

    hub.post(&t, "/chaos/fail/database", json!({}), None)
        .await
        .problem(404, "CELL_NOT_FOUND");
    assert_eq!(hub.balance(&t, &alice).await, 800);
    assert_eq!(hub.trial_balance(&t).await["balanced"], true);
    hub.stop().await;
}

async fn fifty_concurrent_payments_with_one_key_move_money_once(engine: Engine) {
    let Some(hub) = TestHub::spawn(engine).await else {
        return;
    };
    let hub = Arc::new(hub);
    let t = hub.tenant.clone();
    let alice = hub.open_account(&t, "Alice", "EUR", 1_000_000).await;
    let bob = hub.open_account(&t, "Bob", "EUR", 0).await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (hub, t, alice, bob) = (hub.clone(), t.clone(), alice.clone(), bob.clone());
        tasks.push(tokio::spawn(async move {
            hub.pay(&t, &alice, &bob, 700, "EUR", "same-key").await
        }));
    }
    let mut ids = HashSet::new();
    let mut fresh = 0;
    for task in tasks {
        let answer = task.await.expect("task");
        assert_eq!(answer.status, 201, "{}", answer.body);
        ids.insert(
            answer.body["transaction_id"]
                .as_str()
                .expect("id")
                .to_owned(),
        );
        if answer.header("idempotent-replayed").is_none() {
            fresh += 1;
        }
    }
    assert_eq!(ids.len(), 1, "one payment");
    assert_eq!(fresh, 1, "one answer moved money, 49 replayed it");
    assert_eq!(hub.balance(&t, &bob).await, 700);
    assert_eq!(hub.balance(&t, &alice).await, 1_000_000 - 700);
    assert_eq!(hub.db.scalar("SELECT COUNT(*) FROM payments").await, 1);
    assert_eq!(hub.db.scalar("SELECT COUNT(*) FROM outbox").await, 1);
    assert_eq!(hub.trial_balance(&t).await["balanced"], true);
}

async fn opposite_concurrent_payments_do_not_deadlock(engine: Engine) {
    let Some(hub) = TestHub::spawn(engine).await else {
        return;
    };
    let hub = Arc::new(hub);
    let t = hub.tenant.clone();
    let a = hub.open_account(&t, "A", "EUR", 100_000).await;
    let b = hub.open_account(&t, "B", "EUR", 100_000).await;
    let mut tasks = Vec::new();
    for i in 0..80 {
        let (hub, t) = (hub.clone(), t.clone());
        let (payer, payee) = if i % 2 == 0 {
            (a.clone(), b.clone())
        } else {
            (b.clone(), a.clone())
        };
        tasks.push(tokio::spawn(async move {
            hub.pay(&t, &payer, &payee, 10 + i, "EUR", &format!("opp-{i}"))
                .await
        }));
    }
    let finished = tokio::time::timeout(Duration::from_secs(60), async {
        let mut statuses = Vec::new();
        for task in tasks {
            statuses.push(task.await.expect("task").status);
        }
        statuses
    })
    .await
    .expect("no deadlock: every payment finishes");
    assert!(finished.iter().all(|s| *s == 201), "{finished:?}");
    let total = hub.balance(&t, &a).await + hub.balance(&t, &b).await;
    assert_eq!(total, 200_000);
    // Even i moved a -> b, odd b -> a.
    let moved: i64 = (0..80)
        .map(|i| if i % 2 == 0 { -(10 + i) } else { 10 + i })
        .sum();
    assert_eq!(hub.balance(&t, &a).await, 100_000 + moved);
    assert_eq!(hub.db.scalar("SELECT COUNT(*) FROM ledger_entries WHERE transaction_id IN (SELECT id FROM payments)").await, 160);
}

async fn bad_input_gets_problem_answers(engine: Engine) {
    let Some(hub) = TestHub::spawn(engine).await else {
        return;
    };
    let t = hub.tenant.clone();
    let alice = hub.open_account(&t, "Alice", "EUR", 1_000).await;
    let bob = hub.open_account(&t, "Bob", "EUR", 0).await;

    let mut malformed = hub.call(&t, Method::POST, "/payments/process");
    malformed.key = Some("bad-1");
    malformed.raw_body = Some(("application/json", b"{\"amount_minor\": 1,".to_vec()));
    hub.send(malformed).await.problem(400, "VALIDATION_ERROR");

    let mut wrong_type = hub.call(&t, Method::POST, "/payments/process");
    wrong_type.key = Some("bad-2");
    wrong_type.raw_body = Some(("text/plain", b"{}".to_vec()));
    hub.send(wrong_type)
        .await
        .problem(415, "UNSUPPORTED_MEDIA_TYPE");

    let mut huge_body = hub.call(&t, Method::POST, "/payments/process");
    huge_body.key = Some("bad-3");
    huge_body.raw_body = Some(("application/json", vec![b' '; 100 * 1024]));
    hub.send(huge_body).await.problem(413, "PAYLOAD_TOO_LARGE");

    // A NUL byte (which PostgreSQL cannot store) in a reference or a name is
    // a 400 naming the field, never a 500, and writes nothing.
    let nul_payment = json!({"amount_minor": 1, "currency": "EUR", "payer_account": alice, "payee_account": bob, "reference": "a\u{0}b"});
    hub.post(&t, "/payments/process", nul_payment, Some("bad-nul"))
        .await
        .problem(400, "VALIDATION_ERROR");
    hub.post(
        &t,
        "/ledger/accounts",
        json!({"name": "x\u{0}", "currency": "EUR", "opening_balance_minor": 0}),
        None,
    )
    .await
    .problem(400, "VALIDATION_ERROR");
    assert_eq!(hub.db.scalar("SELECT COUNT(*) FROM payments").await, 0);

    for amount in [
        json!(1_000_000_000_000_000_001i64),
        json!(99_999_999_999_999_999_999.0),
        json!(0),
        json!(-1),
        json!(1.5),
    ] {
        let body = json!({"amount_minor": amount, "currency": "EUR", "payer_account": alice, "payee_account": bob, "reference": "x"});
        let answer = hub
            .post(&t, "/payments/process", body, Some("bad-amount"))
            .await;
        let problem = answer.problem(400, "VALIDATION_ERROR");
        assert_eq!(problem["errors"][0]["field"], "amount_minor", "{problem}");
    }
    let body = json!({"amount_minor": 1, "currency": "eur", "payer_account": "not-a-uuid", "payee_account": bob, "reference": ""});
    let answer = hub
        .post(&t, "/payments/process", body, Some("bad-fields"))
        .await;
    let fields: Vec<&str> = answer.problem(400, "VALIDATION_ERROR")["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| e["field"].as_str().expect("field"))
        .collect();
    assert_eq!(fields, ["currency", "payer_account", "reference"]);
    hub.get(&t, "/ledger/accounts/%FF%FE")
        .await
        .problem(400, "VALIDATION_ERROR");
    hub.get(&t, "/ledger/accounts/not-a-uuid")
        .await
        .problem(400, "VALIDATION_ERROR");
    hub.get(&t, "/payments/status/1234")
        .await
        .problem(400, "VALIDATION_ERROR");
    hub.get(&t, "/payments?limit=1001")
        .await
        .problem(400, "VALIDATION_ERROR");
    hub.get(&t, "/ledger/accounts?cursor=nope")
        .await
        .problem(400, "VALIDATION_ERROR");
    hub.get(&t, "/no/such/path").await.problem(404, "NOT_FOUND");

    // Injection attempts are data: stored and answered verbatim.
    let sneaky_name = "Robert'); DROP TABLE accounts;--";
    let sneaky = hub.open_account(&t, sneaky_name, "EUR", 0).await;
    let reference = "'; DELETE FROM payments; -- <script>alert(1)</script> \u{00e9}";
    let body = json!({"amount_minor": 5, "currency": "EUR", "payer_account": alice, "payee_account": sneaky, "reference": reference});
    let paid = hub
        .post(
            &t,
            "/payments/process",
            body,
            Some("'; DROP TABLE payments;--"),
        )
        .await;
    assert_eq!(paid.status, 201, "{}", paid.body);
    assert_eq!(paid.body["reference"], reference);
    let id = paid.body["transaction_id"].as_str().expect("id");
    assert_eq!(
        hub.get(&t, &format!("/payments/status/{id}")).await.body["reference"],
        reference
    );
    assert_eq!(
        hub.get(&t, &format!("/ledger/accounts/{sneaky}"))
            .await
            .body["name"],
        sneaky_name
    );
    assert_eq!(hub.db.scalar("SELECT COUNT(*) FROM payments").await, 1);
    assert_eq!(hub.balance(&t, &alice).await, 995);
    hub.stop().await;
}

async fn lists_page_newest_first(engine: Engine) {
    let Some(hub) = TestHub::spawn(engine).await else {
        return;
    };
    let t = hub.tenant.clone();
    let a = hub.open_account(&t, "A", "EUR", 1_000).await;
    let b = hub.open_account(&t, "B", "EUR", 0).await;
    let mut made = Vec::new();
    for i in 0..5 {
        let paid = hub
            .pay(&t, &a, &b, 1 + i, "EUR", &format!("list-{i}"))
            .await;
        made.push(paid.body["transaction_id"].as_str().expect("id").to_owned());
    }
    made.reverse();
    let first = hub.get(&t, "/payments?limit=2").await;
    assert_eq!(first.status, 200, "{}", first.body);
    let ids = |page: &Value| -> Vec<String> {
        page["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|p| p["transaction_id"].as_str().expect("id").to_owned())
            .collect()
    };
    assert_eq!(ids(&first.body), made[..2]);
    assert_eq!(
        first.body["items"][0]["ledger_entries"]
            .as_array()
            .expect("entries")
            .len(),
        2
    );
    let cursor = first.body["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let second = hub
        .get(&t, &format!("/payments?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(ids(&second.body), made[2..4]);
    let cursor = second.body["next_cursor"]
        .as_str()
        .expect("a last page")
        .to_owned();
    let last = hub
        .get(&t, &format!("/payments?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(ids(&last.body), made[4..]);
    assert_eq!(last.body["next_cursor"], Value::Null);

    let accounts = hub.get(&t, "/ledger/accounts").await;
    let kinds: Vec<&str> = accounts.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|a| a["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(kinds.len(), 3, "A, B and the EUR funding account");
    assert!(kinds.contains(&"funding"));
    let other = hub
        .get(&Uuid::now_v7().to_string(), "/ledger/accounts")
        .await;
    assert_eq!(other.body, json!({"items": [], "next_cursor": null}));
    hub.stop().await;
}

async fn account_openings_honor_idempotency_keys(engine: Engine) {
    let Some(hub) = TestHub::spawn(engine).await else {
        return;
    };
    let t = hub.tenant.clone();
    let body = json!({"name": "Alice", "currency": "EUR", "opening_balance_minor": 500});
    let first = hub
        .post(&t, "/ledger/accounts", body.clone(), Some("open-1"))
        .await;
    assert_eq!(first.status, 201, "{}", first.body);
    assert_eq!(first.body["kind"], "customer");
    assert_eq!(first.body["balance_minor"], 500);
    let again = hub
        .post(&t, "/ledger/accounts", body.clone(), Some("open-1"))
        .await;
    assert_eq!(again.status, 201);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body["id"], first.body["id"]);
    let mut other = body;
    other["opening_balance_minor"] = json!(501);
    hub.post(&t, "/ledger/accounts", other, Some("open-1"))
        .await
        .problem(422, "IDEMPOTENCY_KEY_REUSED");
    let trial = hub.trial_balance(&t).await;
    assert_eq!(
        trial["currencies"][0]["credits_minor"], 500,
        "posted once: {trial}"
    );
    assert_eq!(trial["balanced"], true);
    hub.stop().await;
}

/// A stand-in for the kernel's token, whoami and publish endpoints.
#[derive(Default)]
struct FakeKernel {
    /// (headers, body) of each publish. A std mutex: no `.await` is held across it.
    publishes: Mutex<Vec<(HeaderMap, Value)>>,
    tenant: Mutex<String>,
}

async fn fake_token(Json(body): Json<Value>) -> Response {
    if body["client_secret"] != "sas_hub_secret" {
        return (StatusCode::UNAUTHORIZED, Json(json!({"type": "about:blank", "title": "no", "status": 401, "detail": "bad", "code": "UNAUTHORIZED"}))).into_response();
    }
    Json(json!({"access_token": "tok-1", "token_type": "Bearer", "expires_in": 900}))
        .into_response()
}

async fn fake_me(State(kernel): State<Arc<FakeKernel>>) -> Json<Value> {
    let tenant = kernel.tenant.lock().expect("lock").clone();
    Json(
        json!({"actor_type": "service", "subject": {"id": "sa", "name": "hub", "email": null},
        "tenant": {"id": tenant, "slug": "acme"}, "session_id": "s", "permissions": []}),
    )
}

async fn fake_publish(
    State(kernel): State<Arc<FakeKernel>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let mut publishes = kernel.publishes.lock().expect("lock");
    publishes.push((headers, body));
    let seq = publishes.len();
    (
        StatusCode::CREATED,
        Json(json!({"id": Uuid::now_v7().to_string(), "seq": seq})),
    )
        .into_response()
}

async fn start_fake_kernel(
    listener: tokio::net::TcpListener,
    kernel: Arc<FakeKernel>,
) -> tokio::task::JoinHandle<()> {
    let app = axum::Router::new()
        .route("/api/kernel/auth/token", post(fake_token))
        .route("/api/kernel/auth/me", get(fake_me))
        .route("/api/kernel/events/publish", post(fake_publish))
        .with_state(kernel);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })
}

async fn the_outbox_delivers_after_the_kernel_comes_back(engine: Engine) {
    // A port nothing listens on yet: the kernel is down when the hub starts.
    let probe = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let kernel_addr = probe.local_addr().expect("addr");
    drop(probe);
    let accounts = vec![ServiceAccountCredentials {
        client_id: "hub".into(),
        client_secret: "sas_hub_secret".into(),
    }];
    let Some(hub) =
        TestHub::spawn_with(engine, Some(format!("http://{kernel_addr}")), accounts).await
    else {
        return;
    };
    let t = hub.tenant.clone();
    // A tenant with no service account: its row waits, it is never dropped.
    let orphan = Uuid::now_v7().to_string();
    let a = hub.open_account(&t, "A", "EUR", 1_000).await;
    let b = hub.open_account(&t, "B", "EUR", 0).await;
    let x = hub.open_account(&orphan, "X", "EUR", 1_000).await;
    let y = hub.open_account(&orphan, "Y", "EUR", 0).await;
    let paid = hub.pay(&t, &a, &b, 250, "EUR", "evt-1").await;
    assert_eq!(paid.status, 201);
    let cid = paid.body["correlation_id"]
        .as_str()
        .expect("cid")
        .to_owned();
    let id = paid.body["transaction_id"].as_str().expect("id").to_owned();
    assert_eq!(
        hub.pay(&orphan, &x, &y, 1, "EUR", "evt-orphan")
            .await
            .status,
        201
    );

    // The publisher tries, fails, and keeps the row.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while hub
        .db
        .scalar("SELECT CAST(COALESCE(MAX(attempts), 0) AS BIGINT) FROM outbox")
        .await
        < 1
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the publisher never tried"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        hub.db
            .scalar("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL")
            .await,
        2
    );

    // The kernel comes up on that port.
    let kernel = Arc::new(FakeKernel::default());
    *kernel.tenant.lock().expect("lock") = t.clone();
    let listener = tokio::net::TcpListener::bind(kernel_addr)
        .await
        .expect("rebind the kernel's port");
    let server = start_fake_kernel(listener, kernel.clone()).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while hub
        .db
        .scalar("SELECT COUNT(*) FROM outbox WHERE published_at IS NOT NULL")
        .await
        < 1
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the event was never delivered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let key = {
        let publishes = kernel.publishes.lock().expect("lock");
        assert_eq!(publishes.len(), 1, "delivered once");
        let (headers, body) = &publishes[0];
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        assert_eq!(
            header("x-correlation-id"),
            Some(cid.clone()),
            "the request's correlation id"
        );
        assert_eq!(header("authorization").as_deref(), Some("Bearer tok-1"));
        assert_eq!(body["type"], "finance.payment.processed");
        assert_eq!(body["subject"], id.as_str());
        assert_eq!(
            body["payload"],
            json!({"transaction_id": id, "amount_minor": 250, "currency": "EUR",
            "payer_account": a, "payee_account": b, "reference": "test"})
        );
        header("idempotency-key").expect("a key")
    };
    assert_eq!(
        hub.db
            .scalar(&format!(
                "SELECT COUNT(*) FROM outbox WHERE id = '{key}' AND published_at IS NOT NULL"
            ))
            .await,
        1,
        "the key is the outbox row's id"
    );
    // The orphan tenant's row waits with its reason, never dropped.
    assert_eq!(
        hub.db
            .scalar(
                "SELECT COUNT(*) FROM outbox WHERE published_at IS NULL AND last_error IS NOT NULL"
            )
            .await,
        1
    );
    assert_eq!(hub.db.scalar("SELECT COUNT(*) FROM outbox").await, 2);

    // A payment while the kernel is up is published promptly (woken after commit).
    let again = hub.pay(&t, &a, &b, 1, "EUR", "evt-2").await;
    assert_eq!(again.status, 201);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while kernel.publishes.lock().expect("lock").len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the second event was never delivered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A burst: every event delivered once, each under its own key.
    let hub = Arc::new(hub);
    let mut burst = Vec::new();
    for i in 0..30 {
        let (hub, t, a, b) = (hub.clone(), t.clone(), a.clone(), b.clone());
        burst.push(tokio::spawn(async move {
            hub.pay(&t, &a, &b, 1, "EUR", &format!("burst-{i}"))
                .await
                .status
        }));
    }
    for task in burst {
        assert_eq!(task.await.expect("task"), 201);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while hub
        .db
        .scalar("SELECT COUNT(*) FROM outbox WHERE published_at IS NOT NULL")
        .await
        < 32
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the burst was not delivered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let keys: HashSet<String> = kernel
        .publishes
        .lock()
        .expect("lock")
        .iter()
        .filter_map(|(headers, _)| {
            headers
                .get("idempotency-key")?
                .to_str()
                .ok()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(
        keys.len(),
        32,
        "one publish per payment, each with its own key"
    );
    assert_eq!(
        kernel.publishes.lock().expect("lock").len(),
        32,
        "none twice"
    );
    Arc::try_unwrap(hub)
        .ok()
        .expect("the last handle")
        .stop()
        .await;
    server.abort();
}

async fn clients_hanging_up_mid_payment_leave_nothing_half_written(engine: Engine) {
    let Some(hub) = TestHub::spawn(engine).await else {
        return;
    };
    let t = hub.tenant.clone();
    let a = hub.open_account(&t, "A", "EUR", 1_000_000).await;
    let b = hub.open_account(&t, "B", "EUR", 0).await;
    let mut tasks = Vec::new();
    for i in 0..60u64 {
        let cid = Uuid::now_v7().to_string();
        let token = common::sign(
            &hub.secret,
            &t,
            common::TEST_USER,
            &cid,
            "POST",
            "/payments/process",
        );
        let request = hub
            .http
            .post(hub.url("/payments/process"))
            .header("x-kernel-assertion", token)
            .header("x-correlation-id", cid)
            .header("idempotency-key", format!("hang-up-{i}"))
            .json(&json!({"amount_minor": 1 + i as i64, "currency": "EUR", "payer_account": a, "payee_account": b, "reference": "hang up"}))
            // Gone after 0 to 4 ms: some before, some during, some after the transaction.
            .timeout(Duration::from_millis(i % 5));
        tasks.push(tokio::spawn(async move {
            request.send().await.map(|r| r.status().as_u16()).ok()
        }));
    }
    for task in tasks {
        let _ = task.await.expect("task");
    }
    // A payment queued behind all of them: once it is answered, every
    // transaction begun before it has ended (SQLite's single writer), and on
    // PostgreSQL the pool must still hand out clean connections.
    let last = hub.pay(&t, &a, &b, 1, "EUR", "after-the-hang-ups").await;
    assert_eq!(last.status, 201, "{}", last.body);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let payments = hub.db.scalar("SELECT COUNT(*) FROM payments").await;
    assert!(payments >= 1);
    assert_eq!(
        hub.db.scalar("SELECT COUNT(*) FROM ledger_entries WHERE transaction_id IN (SELECT id FROM payments)").await,
        payments * 2,
        "every committed payment has both entries"
    );
    assert_eq!(hub.db.scalar("SELECT COUNT(*) FROM outbox").await, payments);
    assert_eq!(
        hub.balance(&t, &a).await + hub.balance(&t, &b).await,
        1_000_000
    );
    let moved = hub
        .db
        .scalar("SELECT CAST(COALESCE(SUM(amount_minor), 0) AS BIGINT) FROM payments")
        .await;
    assert_eq!(
        hub.balance(&t, &b).await,
        moved,
        "the balances match the payments made"
    );
    assert_eq!(hub.trial_balance(&t).await["balanced"], true);
    if engine == Engine::Postgres {
        let stuck = hub
            .db
            .scalar("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'idle in transaction'")
            .await;
        assert_eq!(
            stuck, 0,
            "no pooled connection was left inside a transaction"
        );
    }
    hub.stop().await;
}

/// PostgreSQL only: the database goes away under a running hub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_does_not_answer_fails_the_ledger_cell_and_payments_answer_503() {
    let Some(hub) = TestHub::spawn(Engine::Postgres).await else {
        return;
    };
    let t = hub.tenant.clone();
    let a = hub.open_account(&t, "A", "EUR", 100).await;
    let b = hub.open_account(&t, "B", "EUR", 0).await;
    hub.db.vanish().await;

    let health = hub
        .http
        .get(hub.url("/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), 503);
    let body = health.json::<Value>().await.expect("json");
    assert_eq!(body["status"], "degraded");
    assert_eq!(body["cells"]["ledger"], json!({"status": "failed"}));
    assert_eq!(body["cells"]["gateway"], json!({"status": "healthy"}));

    let paid = hub.pay(&t, &a, &b, 1, "EUR", "db-gone").await;
    paid.problem(503, "LEDGER_DOWN");
    assert!(
        !paid.body["detail"]
            .as_str()
            .expect("detail")
            .contains("sqlx"),
        "{}",
        paid.body
    );
    hub.stop().await;
}
