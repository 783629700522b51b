//! `component.crash`: `kill -9` under load. Clients publish events and create
//! roles (audited changes), recording every id the kernel acknowledged; the
//! kernel is killed while they write, restarted on the same data, and every
//! acknowledged event and role must be readable, and `aibos audit verify`
//! must pass on the data.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::Mutex;

use super::kernel::{World, admin_token, password, publish};
use super::{Context, Verdict, http_client, ms, secs};

/// Writing clients during the load.
const CLIENTS: u64 = 4;
/// Load before the kill.
const LOAD: Duration = Duration::from_millis(1500);
/// Reads of acknowledged ids in flight at once after the restart.
const CHECKS_IN_FLIGHT: usize = 16;

/// What the scenario measured.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    pub acknowledged_events: usize,
    pub acknowledged_roles: usize,
    pub lost_events: Vec<String>,
    pub lost_roles: Vec<String>,
    pub restart: Duration,
    pub audit_verify_exit: i32,
    pub audit_verify_output: String,
}

pub fn judge(o: &Observation) -> Verdict {
    let mut failures = Vec::new();
    if o.acknowledged_events == 0 || o.acknowledged_roles == 0 {
        failures.push(format!(
            "the load acknowledged {} events and {} roles before the kill: nothing to check",
            o.acknowledged_events, o.acknowledged_roles
        ));
    }
    if !o.lost_events.is_empty() {
        failures.push(format!(
            "{} acknowledged events are missing after the restart (first: {})",
            o.lost_events.len(),
            o.lost_events[0]
        ));
    }
    if !o.lost_roles.is_empty() {
        failures.push(format!(
            "{} acknowledged roles are missing after the restart (first: {})",
            o.lost_roles.len(),
            o.lost_roles[0]
        ));
    }
    if o.audit_verify_exit != 0 {
        failures.push(format!(
            "aibos audit verify exited {}: {}",
            o.audit_verify_exit,
            o.audit_verify_output.trim()
        ));
    }
    let summary = format!(
        "kill -9 under load; {} of {} acknowledged events and {} of {} acknowledged roles lost; restarted in {}; audit verify exit {}",
        o.lost_events.len(),
        o.acknowledged_events,
        o.lost_roles.len(),
        o.acknowledged_roles,
        secs(o.restart),
        o.audit_verify_exit
    );
    let figures = json!({
        "acknowledged_events": o.acknowledged_events,
        "acknowledged_roles": o.acknowledged_roles,
        "lost_events": o.lost_events.len(),
        "lost_roles": o.lost_roles.len(),
        "restart_ms": ms(o.restart),
        "audit_verify_exit": o.audit_verify_exit,
    });
    Verdict::judged(summary, figures, failures)
}

#[derive(Default)]
struct Acknowledged {
    events: Vec<String>,
    roles: Vec<String>,
}

pub async fn run(context: &Context) -> anyhow::Result<Verdict> {
    let world = World::create(context, "component.crash").await?;
    let result = observe(context, &world).await;
    world.remove().await;
    Ok(judge(&result?))
}

async fn observe(context: &Context, world: &World) -> anyhow::Result<Observation> {
    let http = http_client(Duration::from_secs(10))?;
    let mut kernel = world.start_kernel().await?;
    let password = password();
    let token = admin_token(&http, &kernel, world, &password, true).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(Mutex::new(Acknowledged::default()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (http, base, token, stop, acknowledged) = (
                http.clone(),
                kernel.base.clone(),
                token.clone(),
                stop.clone(),
                acknowledged.clone(),
            );
            tokio::spawn(async move {
                let mut n = 0u64;
                // A client stops at its first failure: the kernel is gone.
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    match publish(&http, &base, &token, n).await {
                        Ok((201, Some(id))) => acknowledged.lock().await.events.push(id),
                        _ => return,
                    }
                    let role = http
                        .post(format!("{base}/api/kernel/roles"))
                        .bearer_auth(&token)
                        .json(&json!({ "name": format!("chaos-{client}-{n}"), "permissions": ["kernel.event.read"] }))
                        .send()
                        .await;
                    let Ok(role) = role else { return };
                    if role.status() != 201 {
                        return;
                    }
                    let Ok(body) = role.json::<Value>().await else {
                        return;
                    };
                    match body["id"].as_str() {
                        Some(id) => acknowledged.lock().await.roles.push(id.to_owned()),
                        None => return,
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(LOAD).await;
    // The crash, while the clients write.
    kernel.kill9().await;
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        let _ = client.await;
    }
    let mut acknowledged = std::mem::take(&mut *acknowledged.lock().await);
    if context.sabotage {
        // The harness's own test: an id the kernel never acknowledged is
        // counted as acknowledged, so the loss check must find it missing.
        acknowledged.events.push(uuid::Uuid::now_v7().to_string());
    }

    let started = Instant::now();
    let kernel = world.start_kernel().await?;
    let restart = started.elapsed();
    let token = admin_token(&http, &kernel, world, &password, false).await?;
    let lost_events = missing(&http, &kernel.base, &token, "events", &acknowledged.events).await;
    let lost_roles = missing(&http, &kernel.base, &token, "roles", &acknowledged.roles).await;
    kernel.stop().await;
    let (audit_verify_exit, audit_verify_output) = world.cli(&["audit", "verify"]).await?;
    Ok(Observation {
        acknowledged_events: acknowledged.events.len(),
        acknowledged_roles: acknowledged.roles.len(),
        lost_events,
        lost_roles,
        restart,
        audit_verify_exit,
        audit_verify_output,
    })
}

/// The ids among `ids` that `GET /api/kernel/{kind}/{id}` does not find.
async fn missing(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    kind: &str,
    ids: &[String],
) -> Vec<String> {
    let mut lost = Vec::new();
    for chunk in ids.chunks(CHECKS_IN_FLIGHT) {
        let reads = chunk.iter().map(|id| async move {
            let found = http
                .get(format!("{base}/api/kernel/{kind}/{id}"))
                .bearer_auth(token)
                .send()
                .await
                .map(|r| r.status() == 200)
                .unwrap_or(false);
            (id, found)
        });
        for (id, found) in futures_util::future::join_all(reads).await {
            if !found {
                lost.push(id.clone());
            }
        }
    }
    lost
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> Observation {
        Observation {
            acknowledged_events: 40,
            acknowledged_roles: 39,
            restart: Duration::from_millis(400),
            ..Observation::default()
        }
    }

    #[test]
    fn nothing_lost_and_a_verified_chain_pass() {
        assert_eq!(judge(&healthy()).outcome, super::super::Outcome::Pass);
    }

    #[test]
    fn a_lost_write_a_broken_chain_or_no_load_fail() {
        let mut lost = healthy();
        lost.lost_events = vec!["e1".into()];
        assert_eq!(judge(&lost).outcome, super::super::Outcome::Fail);
        let mut lost = healthy();
        lost.lost_roles = vec!["r1".into()];
        assert_eq!(judge(&lost).outcome, super::super::Outcome::Fail);
        let mut broken = healthy();
        broken.audit_verify_exit = 1;
        assert_eq!(judge(&broken).outcome, super::super::Outcome::Fail);
        let mut idle = healthy();
        idle.acknowledged_events = 0;
        assert_eq!(judge(&idle).outcome, super::super::Outcome::Fail);
    }
}
