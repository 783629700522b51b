//! The webhook keys of the `[events]` section (`events.webhook_*`).
//!
//! Kept beside the webhook code as a struct of their own so the section's
//! other keys (event retention, the NATS relay) and these evolve apart;
//! `config.rs` holds one field of each kind and calls [`validate`].

use serde::{Deserialize, Serialize};

use crate::limits;

/// `events.webhook_*`: delivery of events to webhook subscriptions.
#[derive(Debug, Clone, Serialize)]
pub struct WebhookConfig {
    /// Wait before each attempt of one delivery, from the first (usually 0):
    /// its length is the number of attempts before the dead letter.
    pub webhook_retry_schedule_seconds: Vec<u64>,
    /// How long deliveries carry the old secret's signature beside the new
    /// one's after `rotate-secret`.
    pub webhook_secret_grace_seconds: u64,
    /// A subscription failing without a success for this long is disabled
    /// (fractions allowed, so tests can use seconds).
    pub webhook_disable_after_hours: f64,
    /// Loopback, private and link-local receivers allowed (tests, `aibos demo`).
    pub webhook_allow_private_networks: bool,
    /// One attempt, from connecting to the last byte read.
    pub webhook_timeout_seconds: u64,
    /// Attempts in flight at once in this kernel instance, across subscriptions.
    pub webhook_max_concurrent_deliveries: u64,
}

impl WebhookConfig {
    /// The wait before attempt `index` (0-based), `None` past the last.
    pub fn delay_before(&self, index: usize) -> Option<std::time::Duration> {
        self.webhook_retry_schedule_seconds
            .get(index)
            .map(|s| std::time::Duration::from_secs(*s))
    }

    /// Attempts per delivery.
    pub fn attempts(&self) -> usize {
        self.webhook_retry_schedule_seconds.len()
    }

    /// One attempt's time limit.
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.webhook_timeout_seconds)
    }

    /// How long a subscription may fail before it is disabled.
    pub fn disable_after(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.webhook_disable_after_hours * 3_600.0)
    }
}

/// A list written as a TOML array, or as comma-separated text (the form of
/// `AIBOS_EVENTS__WEBHOOK_RETRY_SCHEDULE_SECONDS=0,5,300`), or one number
/// (`…=0`, which the environment layer reads as a number: one attempt).
#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum RawSchedule {
    /// `[0, 5, 300]`.
    List(Vec<i64>),
    /// `0`.
    One(i64),
    /// `"0,5,300"`.
    Text(String),
}

/// The raw keys as deserialised, checked by [`validate`].
pub(crate) struct RawWebhook {
    pub(crate) webhook_retry_schedule_seconds: RawSchedule,
    pub(crate) webhook_secret_grace_seconds: i64,
    pub(crate) webhook_disable_after_hours: f64,
    pub(crate) webhook_allow_private_networks: bool,
    pub(crate) webhook_timeout_seconds: i64,
    pub(crate) webhook_max_concurrent_deliveries: i64,
}

/// Checks every key, reporting each problem through `problem(key, message)`.
pub(crate) fn validate(
    raw: RawWebhook,
    problem: &mut impl FnMut(&str, String),
) -> Option<WebhookConfig> {
    let schedule_key = "events.webhook_retry_schedule_seconds";
    let schedule: Option<Vec<i64>> = match raw.webhook_retry_schedule_seconds {
        RawSchedule::List(list) => Some(list),
        RawSchedule::One(wait) => Some(vec![wait]),
        RawSchedule::Text(text) => {
            let parsed: Result<Vec<i64>, _> =
                text.split(',').map(|s| s.trim().parse::<i64>()).collect();
            match parsed {
                Ok(list) => Some(list),
                Err(_) => {
                    problem(
                        schedule_key,
                        "must be a list of whole seconds, such as [0, 5, 300] or 0,5,300".into(),
                    );
                    None
                }
            }
        }
    };
    let schedule = schedule.and_then(|list| {
        if list.is_empty() || list.len() > limits::WEBHOOK_ATTEMPTS_MAX {
            problem(
                schedule_key,
                format!(
                    "must hold 1 to {} waits (one per attempt)",
                    limits::WEBHOOK_ATTEMPTS_MAX
                ),
            );
            return None;
        }
        let waits: Option<Vec<u64>> = list
            .iter()
            .map(|s| {
                u64::try_from(*s)
                    .ok()
                    .filter(|s| *s <= limits::WEBHOOK_RETRY_DELAY_SECONDS_MAX)
            })
            .collect();
        if waits.is_none() {
            problem(
                schedule_key,
                format!(
                    "each wait must be between 0 and {} seconds",
                    limits::WEBHOOK_RETRY_DELAY_SECONDS_MAX
                ),
            );
        }
        waits
    });
    let mut in_range = |key: &str, value: i64, min: u64, max: u64| match u64::try_from(value) {
        Ok(v) if (min..=max).contains(&v) => Some(v),
        _ => {
            problem(
                &format!("events.{key}"),
                format!("{value} is out of range: must be between {min} and {max}"),
            );
            None
        }
    };
    let grace = in_range(
        "webhook_secret_grace_seconds",
        raw.webhook_secret_grace_seconds,
        0,
        limits::WEBHOOK_SECRET_GRACE_SECONDS_MAX,
    );
    let timeout = in_range(
        "webhook_timeout_seconds",
        raw.webhook_timeout_seconds,
        limits::WEBHOOK_TIMEOUT_SECONDS_MIN,
        limits::WEBHOOK_TIMEOUT_SECONDS_MAX,
    );
    let concurrent = in_range(
        "webhook_max_concurrent_deliveries",
        raw.webhook_max_concurrent_deliveries,
        1,
        limits::WEBHOOK_CONCURRENT_DELIVERIES_MAX,
    );
    let hours = raw.webhook_disable_after_hours;
    let disable_after =
        if hours.is_finite() && hours > 0.0 && hours <= limits::WEBHOOK_DISABLE_AFTER_HOURS_MAX {
            Some(hours)
        } else {
            problem(
                "events.webhook_disable_after_hours",
                format!(
                    "{hours} is out of range: must be more than 0 and at most {}",
                    limits::WEBHOOK_DISABLE_AFTER_HOURS_MAX
                ),
            );
            None
        };
    Some(WebhookConfig {
        webhook_retry_schedule_seconds: schedule?,
        webhook_secret_grace_seconds: grace?,
        webhook_disable_after_hours: disable_after?,
        webhook_allow_private_networks: raw.webhook_allow_private_networks,
        webhook_timeout_seconds: timeout?,
        webhook_max_concurrent_deliveries: concurrent?,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError, ConfigSources};

    fn load(env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let sources = ConfigSources::new(
            dir.path(),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        );
        Config::load(&sources)
    }

    #[test]
    fn the_defaults_are_the_spec_s() {
        let webhook = Config::defaults().events.webhook;
        assert_eq!(
            webhook.webhook_retry_schedule_seconds,
            [0, 5, 300, 1800, 7200, 18000, 36000, 36000]
        );
        assert_eq!(webhook.webhook_secret_grace_seconds, 86_400);
        assert_eq!(webhook.webhook_disable_after_hours, 120.0);
        assert!(!webhook.webhook_allow_private_networks);
        assert_eq!(webhook.attempts(), 8);
        assert_eq!(
            webhook.delay_before(2),
            Some(std::time::Duration::from_secs(300))
        );
        assert_eq!(webhook.delay_before(8), None);
    }

    #[test]
    fn the_environment_sets_the_schedule_as_a_comma_list_and_the_switch() {
        let config = load(&[
            ("AIBOS_EVENTS__WEBHOOK_RETRY_SCHEDULE_SECONDS", "0,1, 2"),
            ("AIBOS_EVENTS__WEBHOOK_ALLOW_PRIVATE_NETWORKS", "true"),
            ("AIBOS_EVENTS__WEBHOOK_DISABLE_AFTER_HOURS", "0.5"),
        ])
        .unwrap();
        let webhook = config.events.webhook;
        assert_eq!(webhook.webhook_retry_schedule_seconds, [0, 1, 2]);
        assert!(webhook.webhook_allow_private_networks);
        assert_eq!(
            webhook.disable_after(),
            std::time::Duration::from_secs(1_800)
        );
        let listed = load(&[("AIBOS_EVENTS__WEBHOOK_RETRY_SCHEDULE_SECONDS", "[3, 4]")]).unwrap();
        assert_eq!(listed.events.webhook.webhook_retry_schedule_seconds, [3, 4]);
        let one = load(&[("AIBOS_EVENTS__WEBHOOK_RETRY_SCHEDULE_SECONDS", "0")]).unwrap();
        assert_eq!(
            one.events.webhook.webhook_retry_schedule_seconds,
            [0],
            "a single attempt"
        );
    }

    #[test]
    fn out_of_range_values_are_each_listed() {
        let error = load(&[
            ("AIBOS_EVENTS__WEBHOOK_RETRY_SCHEDULE_SECONDS", "0,x"),
            ("AIBOS_EVENTS__WEBHOOK_TIMEOUT_SECONDS", "0"),
            ("AIBOS_EVENTS__WEBHOOK_MAX_CONCURRENT_DELIVERIES", "100000"),
            ("AIBOS_EVENTS__WEBHOOK_DISABLE_AFTER_HOURS", "0"),
            ("AIBOS_EVENTS__WEBHOOK_SECRET_GRACE_SECONDS", "-1"),
        ])
        .unwrap_err();
        let keys: Vec<&str> = error.problems().iter().map(|p| p.key.as_str()).collect();
        for key in [
            "events.webhook_retry_schedule_seconds",
            "events.webhook_timeout_seconds",
            "events.webhook_max_concurrent_deliveries",
            "events.webhook_disable_after_hours",
            "events.webhook_secret_grace_seconds",
        ] {
            assert!(keys.contains(&key), "{key} in {keys:?}");
        }
        let too_many = vec!["1"; crate::limits::WEBHOOK_ATTEMPTS_MAX + 1].join(",");
        assert!(load(&[("AIBOS_EVENTS__WEBHOOK_RETRY_SCHEDULE_SECONDS", &too_many)]).is_err());
        assert!(load(&[("AIBOS_EVENTS__WEBHOOK_RETRY_SCHEDULE_SECONDS", "[]")]).is_err());
    }
}
