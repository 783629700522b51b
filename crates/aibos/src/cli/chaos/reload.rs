//! `config.invalid`: SIGHUP with a broken configuration file. The file the
//! harness writes lowers the user rate limit *and* holds an invalid value;
//! the kernel must refuse the whole of it: the old limit stays in force (seen
//! in the `RateLimit-Policy` header of a real request), the kernel keeps
//! answering in the same process, and `config.reload_failed` is audited.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::kernel::{Kernel, World, admin_token, password};
use super::{Context, Verdict, http_client, ms, secs};

/// The user rate limit the kernel starts with: a number seen nowhere else.
const LIMIT_BEFORE: u64 = 543_210;
/// The one the broken file asks for.
const LIMIT_IN_BROKEN_FILE: u64 = 111;
/// How long the audit entry has to appear after the SIGHUP.
const AUDIT_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Default)]
pub struct Observation {
    pub policy_before: Option<String>,
    pub policy_after: Option<String>,
    pub reload_failed_audited: bool,
    pub audited_after: Duration,
    pub answers_after: bool,
    pub same_process: bool,
}

pub fn judge(o: &Observation) -> Verdict {
    let mut failures = Vec::new();
    let expected = format!("\"user\";q={LIMIT_BEFORE};");
    match &o.policy_before {
        Some(p) if p.contains(&expected) => {}
        other => failures.push(format!(
            "before the reload the user limit is not the configured {LIMIT_BEFORE}: RateLimit-Policy {other:?}"
        )),
    }
    if o.policy_after != o.policy_before {
        failures.push(format!(
            "the broken file changed the configuration in force: RateLimit-Policy {:?} became {:?}",
            o.policy_before, o.policy_after
        ));
    }
    if !o.reload_failed_audited {
        failures.push(format!(
            "no config.reload_failed in the audit trail within {}",
            secs(AUDIT_WAIT)
        ));
    }
    if !o.answers_after {
        failures.push("the kernel stopped answering after the SIGHUP".into());
    }
    if !o.same_process {
        failures.push("the kernel process exited after the SIGHUP".into());
    }
    let summary = format!(
        "SIGHUP with a broken file; user limit {} before and {} after; config.reload_failed audited: {} (after {}); kernel answering: {}",
        limit_of(o.policy_before.as_deref()),
        limit_of(o.policy_after.as_deref()),
        o.reload_failed_audited,
        secs(o.audited_after),
        o.answers_after && o.same_process
    );
    let figures = json!({
        "user_limit_before": limit_of(o.policy_before.as_deref()),
        "user_limit_after": limit_of(o.policy_after.as_deref()),
        "reload_failed_audited": o.reload_failed_audited,
        "audited_after_ms": ms(o.audited_after),
        "answers_after": o.answers_after,
        "same_process": o.same_process,
    });
    Verdict::judged(summary, figures, failures)
}

/// The `q` of the `"user"` policy in a `RateLimit-Policy` header, or "?".
fn limit_of(policy: Option<&str>) -> String {
    policy
        .and_then(|p| {
            p.split(',')
                .find(|part| part.trim().starts_with("\"user\""))
        })
        .and_then(|part| part.split(';').find_map(|kv| kv.trim().strip_prefix("q=")))
        .unwrap_or("?")
        .to_owned()
}

pub async fn run(context: &Context) -> anyhow::Result<Verdict> {
    let mut world = World::create(context, "config.invalid").await?;
    world
        .settings
        .set("rate_limit", "user_per_minute", LIMIT_BEFORE.to_string());
    let result = observe(context, &world).await;
    world.remove().await;
    Ok(judge(&result?))
}

async fn observe(context: &Context, world: &World) -> anyhow::Result<Observation> {
    let http = http_client(Duration::from_secs(5))?;
    let mut kernel = world.start_kernel().await?;
    let token = admin_token(&http, &kernel, world, &password(), true).await?;
    let policy_before = user_policy(&http, &kernel, &token).await?;

    let mut broken = world.settings.clone();
    broken.set(
        "rate_limit",
        "user_per_minute",
        LIMIT_IN_BROKEN_FILE.to_string(),
    );
    if !context.sabotage {
        // Out of range (1–86 400): the whole file must be refused.
        broken.set("auth", "access_token_ttl_seconds", "-5");
    }
    // The running kernel's own address, unchanged, so that only the broken
    // value differs from a reload the kernel would accept.
    let bind = kernel.base.trim_start_matches("http://").to_owned();
    broken.set("server", "bind", super::kernel::quoted(&bind));
    let text = broken.render();
    std::fs::write(world.config_file(), text)?;
    kernel.signal("HUP")?;

    let started = Instant::now();
    let mut reload_failed_audited = false;
    while started.elapsed() < AUDIT_WAIT {
        if reload_failed_entries(&http, &kernel, &token).await? > 0 {
            reload_failed_audited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let audited_after = started.elapsed();
    // A valid file takes effect on the next request; give it that chance.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let policy_after = user_policy(&http, &kernel, &token).await.ok().flatten();
    let answers_after = http
        .get(kernel.url("/api/health"))
        .send()
        .await
        .map(|r| r.status() == 200)
        .unwrap_or(false);
    let same_process = kernel.running();
    kernel.stop().await;
    Ok(Observation {
        policy_before,
        policy_after,
        reload_failed_audited,
        audited_after,
        answers_after,
        same_process,
    })
}

/// The `RateLimit-Policy` header of an authenticated request.
async fn user_policy(
    http: &reqwest::Client,
    kernel: &Kernel,
    token: &str,
) -> anyhow::Result<Option<String>> {
    let response = http
        .get(kernel.url("/api/kernel/roles?limit=1"))
        .bearer_auth(token)
        .send()
        .await?;
    Ok(response
        .headers()
        .get("ratelimit-policy")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned))
}

async fn reload_failed_entries(
    http: &reqwest::Client,
    kernel: &Kernel,
    token: &str,
) -> anyhow::Result<usize> {
    let body: Value = http
        .get(kernel.url("/api/kernel/audit?action=config.reload_failed&limit=10"))
        .bearer_auth(token)
        .send()
        .await?
        .json()
        .await?;
    Ok(body["items"].as_array().map_or(0, Vec::len))
}

#[cfg(test)]
mod tests {
    use super::super::Outcome;
    use super::*;

    fn healthy() -> Observation {
        let policy = Some(format!(
            "\"user\";q={LIMIT_BEFORE};w=60, \"tenant\";q=100000000;w=60"
        ));
        Observation {
            policy_before: policy.clone(),
            policy_after: policy,
            reload_failed_audited: true,
            audited_after: Duration::from_millis(120),
            answers_after: true,
            same_process: true,
        }
    }

    #[test]
    fn the_old_configuration_kept_and_audited_passes() {
        assert_eq!(judge(&healthy()).outcome, Outcome::Pass);
        assert_eq!(limit_of(healthy().policy_before.as_deref()), "543210");
    }

    #[test]
    fn a_changed_limit_a_missing_audit_entry_or_a_dead_kernel_fail() {
        let mut changed = healthy();
        changed.policy_after = Some("\"user\";q=111;w=60".into());
        assert_eq!(judge(&changed).outcome, Outcome::Fail);
        let mut silent = healthy();
        silent.reload_failed_audited = false;
        assert_eq!(judge(&silent).outcome, Outcome::Fail);
        let mut dead = healthy();
        dead.same_process = false;
        assert_eq!(judge(&dead).outcome, Outcome::Fail);
        let mut mute = healthy();
        mute.answers_after = false;
        assert_eq!(judge(&mute).outcome, Outcome::Fail);
    }
}
