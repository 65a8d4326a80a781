//! The scheduled relay on Lambda: an EventBridge schedule invokes it every
//! minute or so; it publishes what is due over the polling-shape outbox,
//! within the invocation's time budget, and returns.

use std::time::Duration;

use outbox_core::{time, BatchReport, ClaimSource, Publisher, Relay, StoreError};

use outbox_registry::{DynamoShape, StoreUrl};

use crate::config::{ConfigError, Target, DEFAULT_SOURCE, DEFAULT_TARGET, SOURCE_VAR, TARGET_VAR};

/// The store the relay drains, by URL: `postgres://USER:PASSWORD@HOST/DB`
/// (the RDS shape) or `dynamodb://TABLE?shape=polling`.
pub const STORE_VAR: &str = "OUTBOX_STORE";
/// Shorthand for `OUTBOX_STORE=dynamodb://TABLE?shape=polling`.
pub const TABLE_VAR: &str = "OUTBOX_TABLE";
/// Milliseconds kept free before Lambda's timeout.
pub const MARGIN_MS_VAR: &str = "OUTBOX_MARGIN_MS";
/// Room for one more batch to claim, publish and settle, and for the
/// response: a batch is not started with less than this left.
pub const DEFAULT_MARGIN: Duration = Duration::from_secs(5);

/// Publishes what is or comes due until nothing is left or `budget` less
/// `margin` is spent, whichever comes first: the core relay's
/// [`Relay::drain_until`], so retries, backoff and dead-lettering are the
/// relay's. No publish call runs past that point (less the relay's settle
/// margin), so the invocation ends before Lambda's timeout with its claims
/// settled; what is left stays pending for the next invocation.
pub async fn run_scheduled<S: ClaimSource, P: Publisher>(
    relay: &Relay<S, P>,
    budget: Duration,
    margin: Duration,
) -> Result<BatchReport, StoreError> {
    let deadline = time::instant_after(tokio::time::Instant::now(), budget.saturating_sub(margin));
    relay.drain_until(deadline).await
}

/// The time left before `deadline_ms` (ms since the epoch, as in the Lambda
/// context), zero once past.
pub fn budget_until(deadline_ms: u64) -> Duration {
    let now = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
    Duration::from_millis(deadline_ms.saturating_sub(now))
}

/// What the scheduled relay reads from its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledRelaySettings {
    pub store: StoreUrl,
    pub target: Target,
    pub source: String,
    pub margin: Duration,
}

impl ScheduledRelaySettings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Reads settings through `var`; empty values count as unset.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let store = match (get(STORE_VAR), get(TABLE_VAR)) {
            (Some(url), _) => scheduled_store(STORE_VAR, &url)?,
            (None, Some(table)) => {
                scheduled_store(TABLE_VAR, &format!("dynamodb://{}?shape=polling", table.trim()))?
            }
            (None, None) => {
                return Err(ConfigError::Missing {
                    var: STORE_VAR,
                    hint: "name the store to relay from: postgres://USER:PASSWORD@HOST/DB or dynamodb://TABLE?shape=polling (or set OUTBOX_TABLE to a polling-shape DynamoDB table)",
                })
            }
        };
        let target = get(TARGET_VAR)
            .as_deref()
            .unwrap_or(DEFAULT_TARGET)
            .parse()?;
        let source = get(SOURCE_VAR).unwrap_or_else(|| DEFAULT_SOURCE.to_owned());
        let margin = match get(MARGIN_MS_VAR) {
            None => DEFAULT_MARGIN,
            Some(value) => match value.trim().parse::<u64>() {
                Ok(ms) => Duration::from_millis(ms),
                Err(_) => {
                    return Err(ConfigError::Invalid {
                        var: MARGIN_MS_VAR,
                        reason: "expected a whole number of milliseconds".to_owned(),
                        value,
                    })
                }
            },
        };
        Ok(Self {
            store,
            target,
            source,
            margin,
        })
    }
}

/// A store the scheduled relay can drain: one that keeps each event's state
/// (PostgreSQL, a polling-shape DynamoDB table). A stream-shape table is
/// relayed by `publish-events` from its stream, and a SQLite file would not
/// outlive the execution environment.
fn scheduled_store(var: &'static str, value: &str) -> Result<StoreUrl, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        var,
        value: value.to_owned(),
        reason,
    };
    let store: StoreUrl = value
        .trim()
        .parse()
        .map_err(|e: outbox_registry::RegistryError| invalid(e.to_string()))?;
    match &store {
        StoreUrl::Postgres { .. } => Ok(store),
        StoreUrl::DynamoDb { shape: DynamoShape::Polling, .. } => Ok(store),
        StoreUrl::DynamoDb { .. } => Err(invalid(
            "a stream-shape table is relayed by publish-events from its stream; the scheduled relay needs ?shape=polling".to_owned(),
        )),
        _ => Err(invalid(
            "the scheduled relay drains postgres:// or dynamodb://TABLE?shape=polling".to_owned(),
        )),
    }
}

/// The JSON an invocation answers with.
pub fn report_json(report: &BatchReport) -> serde_json::Value {
    serde_json::json!({
        "claimed": report.claimed,
        "published": report.published,
        "retried": report.retried,
        "deadLettered": report.dead_lettered,
        "released": report.released,
        "deferred": report.deferred,
        "malformed": report.malformed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> Result<ScheduledRelaySettings, ConfigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ScheduledRelaySettings::from_vars(|name| vars.get(name).cloned())
    }

    #[test]
    fn reads_settings() {
        let err = settings(&[]).unwrap_err();
        assert!(err.to_string().contains(STORE_VAR), "{err}");
        let s = settings(&[(TABLE_VAR, "outbox")]).unwrap();
        assert_eq!(s.store, "dynamodb://outbox?shape=polling".parse().unwrap());
        assert_eq!(
            (s.source.as_str(), s.margin),
            (DEFAULT_SOURCE, DEFAULT_MARGIN)
        );
        let s = settings(&[
            (TABLE_VAR, "outbox"),
            (TARGET_VAR, "sqs://orders"),
            (MARGIN_MS_VAR, "1500"),
        ])
        .unwrap();
        assert_eq!(
            s.target,
            Target::Sqs {
                queue: "orders".into()
            }
        );
        assert_eq!(s.margin, Duration::from_millis(1500));
        assert!(settings(&[(TABLE_VAR, "outbox"), (MARGIN_MS_VAR, "soon")]).is_err());
    }

    #[test]
    fn reads_the_rds_shape_and_refuses_stores_it_cannot_drain() {
        let s = settings(&[
            (
                STORE_VAR,
                "postgres://relay:secret@db.internal:5432/orders?schema=outbox",
            ),
            (TABLE_VAR, "ignored"),
        ])
        .unwrap();
        assert!(matches!(s.store, StoreUrl::Postgres { ref schema, .. } if schema == "outbox"));
        // The password never shows in the settings' display.
        assert!(!s.store.to_string().contains("secret"), "{}", s.store);
        for (url, says) in [
            ("dynamodb://outbox", "shape=polling"),
            ("sqlite:///tmp/outbox.db", "postgres://"),
            ("mysql://db/outbox", STORE_VAR),
        ] {
            let err = settings(&[(STORE_VAR, url)]).unwrap_err();
            assert!(err.to_string().contains(says), "{url}: {err}");
            assert!(!err.is_retryable());
        }
        let err = settings(&[(TABLE_VAR, "no")]).unwrap_err();
        assert!(err.to_string().contains(TABLE_VAR), "{err}");
    }

    #[test]
    fn budget_is_zero_past_the_deadline() {
        assert_eq!(budget_until(0), Duration::ZERO);
        let in_a_minute = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap() + 60_000;
        assert!(budget_until(in_a_minute) > Duration::from_secs(55));
    }
}
