//! The scheduled relay: an EventBridge schedule invokes it; it publishes what
//! is due in a polling-shape outbox table until nothing is left or the
//! invocation's time is nearly up, and answers with a summary.
//!
//! Configured by environment (see the crate README): `OUTBOX_STORE` (a
//! PostgreSQL URL for the RDS shape, or a polling-shape DynamoDB table) or
//! `OUTBOX_TABLE`, `OUTBOX_TARGET`, `OUTBOX_SOURCE`, `OUTBOX_MARGIN_MS`.

use lambda_runtime::{service_fn, Error, LambdaEvent};
use outbox_core::{Relay, RelayConfig};
use outbox_lambda::aws_publisher::{load_checked_config, open_publisher};
use outbox_lambda::scheduled::{budget_until, report_json, run_scheduled, ScheduledRelaySettings};

#[tokio::main]
async fn main() -> Result<(), Error> {
    outbox_lambda::init_logging();

    // Built once per execution environment, before the first event.
    let settings = ScheduledRelaySettings::from_env()?;
    // A missing region or credentials, or a bus or queue that does not
    // exist, fails the init, naming the setting.
    let config = load_checked_config().await?;
    let publisher = open_publisher(&config, &settings.target, &settings.source, None).await?;
    // The store must exist already: a mistyped name fails the init instead
    // of idling on an empty new table.
    let store = settings.store.open_existing(Some(&config)).await?;
    let relay = Relay::new(store, publisher, RelayConfig::default())?;
    tracing::info!(store = %settings.store, target = %settings.target, "scheduled relay ready");

    lambda_runtime::run(service_fn(|event: LambdaEvent<serde_json::Value>| {
        let (relay, margin) = (&relay, settings.margin);
        async move {
            let budget = budget_until(event.context.deadline);
            let report = run_scheduled(relay, budget, margin).await?;
            tracing::info!(
                claimed = report.claimed,
                published = report.published,
                retried = report.retried,
                dead_lettered = report.dead_lettered,
                released = report.released,
                "scheduled relay run"
            );
            outbox_lambda::emf::emit(&outbox_lambda::emf::batch_metrics(&report));
            Ok::<serde_json::Value, Error>(report_json(&report))
        }
    }))
    .await
}
