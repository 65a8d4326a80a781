//! `outbox relay`: the long-running relay process.

use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Args;
use outbox_core::{ClaimSource, Publisher, Relay, RelayConfig};

use crate::target::{with_store, Store, StoreUrl, TargetUrl};
use crate::{shutdown_signal, CliError};

#[derive(Debug, Args)]
pub struct RelayArgs {
    #[arg(long)]
    store: StoreUrl,
    /// Where to publish: eventbridge://BUS, sqs://QUEUE, sns://TOPIC_ARN, stdout://, null://.
    #[arg(long)]
    to: TargetUrl,
    /// CloudEvents `source` of the published events.
    #[arg(long, default_value = outbox_core::publish::DEFAULT_SOURCE)]
    source: String,
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// Attempts before an event is dead-lettered.
    #[arg(long, default_value_t = 12)]
    max_attempts: u32,
    /// Longest wait between polls when idle.
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    poll: Duration,
    /// How long claimed events stay reserved; a relay killed while holding
    /// a claim delays those events by at most this much.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    lease: Duration,
    /// Longest wait for one publish call before it counts as failed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    publish_timeout: Duration,
    /// Publish what is due, then exit (for schedulers such as cron).
    #[arg(long)]
    once: bool,
}

/// How often a running relay logs its totals.
const REPORT_EVERY: Duration = Duration::from_secs(30);

pub async fn run(args: RelayArgs) -> Result<(), CliError> {
    let publisher = args.to.publisher(&args.source).await?;
    let config = RelayConfig::default()
        .batch_size(args.batch_size)
        .max_attempts(args.max_attempts)
        .idle_poll(args.poll)
        .lease(args.lease)
        .publish_timeout(args.publish_timeout);
    let store = args.store.open_existing().await?;
    tracing::info!(store = %args.store, to = %args.to, batch_size = args.batch_size, "relay started");
    // A stream relay hands its lease back on the way out, so the next one
    // (or a restart) takes over at once instead of waiting it out.
    let stream = match &store {
        Store::DynamoStream(source) => Some(source.clone()),
        _ => None,
    };
    let result = with_store!(store, s => serve(s, publisher, config, args.once).await);
    if let Some(source) = stream {
        if let Err(e) = source.release().await {
            tracing::warn!(error = %e, "relay: could not hand the stream back; the next relay waits for the lease");
        }
    }
    result
}

async fn serve<S: ClaimSource, P: Publisher>(
    store: S,
    publisher: P,
    config: RelayConfig,
    once: bool,
) -> Result<(), CliError> {
    let relay = Relay::new(store, publisher, config)?;
    let m = relay.metrics();
    let report = if once {
        relay.drain().await?
    } else {
        let totals = async {
            let mut every = tokio::time::interval(REPORT_EVERY);
            every.tick().await;
            loop {
                every.tick().await;
                tracing::info!(
                    published = m.published.load(Ordering::Relaxed),
                    retried = m.retried.load(Ordering::Relaxed),
                    dead_lettered = m.dead_lettered.load(Ordering::Relaxed),
                    store_errors = m.store_errors.load(Ordering::Relaxed),
                    "relay totals"
                );
            }
        };
        tokio::select! {
            report = relay.run(shutdown_signal()) => report?,
            never = totals => never,
        }
    };
    eprintln!(
        "relay stopped: published {}, retried {}, dead-lettered {}, released {}",
        m.published.load(Ordering::Relaxed),
        m.retried.load(Ordering::Relaxed),
        m.dead_lettered.load(Ordering::Relaxed),
        report.released
    );
    Ok(())
}
