//! `outbox relay`: the long-running relay process.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Args;
use outbox_core::{time, ClaimSource, Publisher, Relay, RelayConfig, Stats};

use crate::endpoint::{self, Shared};
use crate::target::{open_existing, open_target, StoreUrl, TargetUrl};
use crate::url_arg::UrlParser;
use crate::{shutdown_signal, CliError};

#[derive(Debug, Args)]
pub struct RelayArgs {
    /// The outbox to drain. From the environment, a password in it stays
    /// out of the process list.
    #[arg(long, env = "OUTBOX_STORE", hide_env_values = true, value_parser = UrlParser::<StoreUrl>::new())]
    store: StoreUrl,
    /// Where to publish: eventbridge://BUS, sqs://QUEUE, sns://TOPIC_ARN,
    /// nats://HOST:PORT[?stream=NAME&subject=TEMPLATE],
    /// amqp://USER:PASS@HOST:PORT[/VHOST][?exchange=NAME], stdout://, null://.
    #[arg(long, env = "OUTBOX_TO", hide_env_values = true, value_parser = UrlParser::<TargetUrl>::new())]
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
    /// Serve Prometheus metrics on /metrics, and /healthz and /readyz, at
    /// this address (such as 127.0.0.1:9187 or 0.0.0.0:9187).
    #[arg(long, conflicts_with = "once")]
    metrics_addr: Option<SocketAddr>,
    /// How often the store's figures (pending count, oldest pending age,
    /// dead letters) are read for the metrics endpoint; each read is one or
    /// a few queries at the store.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    stats_every: Duration,
}

/// How often a running relay logs its totals.
const REPORT_EVERY: Duration = Duration::from_secs(30);
/// Reading the store's figures more often would load it for nothing.
const MIN_STATS_EVERY: Duration = Duration::from_secs(1);

pub async fn run(args: RelayArgs) -> Result<(), CliError> {
    // Absurd durations are refused by the flag the user gave, before
    // anything is opened.
    for (flag, value, max) in [
        ("--lease", args.lease, time::MAX_LEASE),
        ("--poll", args.poll, time::MAX_WAIT),
        ("--publish-timeout", args.publish_timeout, time::MAX_WAIT),
        ("--stats-every", args.stats_every, time::MAX_WAIT),
    ] {
        time::check_at_most(flag, value, max).map_err(CliError::Usage)?;
    }
    let config = RelayConfig::default()
        .batch_size(args.batch_size)
        .max_attempts(args.max_attempts)
        .idle_poll(args.poll)
        .lease(args.lease)
        .publish_timeout(args.publish_timeout);
    config.validate()?;
    if args.stats_every < MIN_STATS_EVERY {
        return Err(CliError::Usage(format!(
            "--stats-every must be at least {MIN_STATS_EVERY:?}: each read queries the store"
        )));
    }
    // A taken port fails the start, before anything is published.
    let listener = match args.metrics_addr {
        Some(addr) => Some(endpoint::bind(addr).await?),
        None => None,
    };
    // What can be known at start fails the start: no region, no
    // credentials, a bus or queue that does not exist, a missing store.
    let publisher = open_target(&args.to, &args.source).await?;
    let store = open_existing(&args.store).await?;
    tracing::info!(store = %args.store, to = %args.to, batch_size = args.batch_size, "relay started");
    let relay = Relay::new(store, publisher, config)?;
    let m = relay.metrics();
    let report = if args.once {
        // What was due at the start, then hand the source back.
        let drained = relay.drain().await;
        if let Err(e) = relay.close().await {
            tracing::warn!(error = %e, "relay: could not hand back the source; the next relay waits for its lease");
        }
        drained?
    } else {
        let shared = Shared::new(relay.metrics());
        let serve = async {
            match listener {
                Some(listener) => {
                    if let Ok(addr) = listener.local_addr() {
                        tracing::info!(%addr, "metrics endpoint: /metrics, /healthz, /readyz");
                    }
                    match endpoint::serve(listener, shared.clone()).await {}
                }
                None => std::future::pending().await,
            }
        };
        let watch = watch(&relay, &shared, args.metrics_addr.map(|_| args.stats_every));
        // `run` hands the source back when it stops.
        tokio::select! {
            report = relay.run(shutdown_signal()) => report?,
            never = serve => never,
            never = watch => match never {},
        }
    };
    eprintln!(
        "relay stopped: published {}, retried {}, dead-lettered {}, deferred {}, released {}",
        m.published.load(Ordering::Relaxed),
        m.retried.load(Ordering::Relaxed),
        m.dead_lettered.load(Ordering::Relaxed),
        m.deferred.load(Ordering::Relaxed),
        report.released
    );
    // A drain that met a target down published only part of what was due:
    // say so, and fail, so a scheduler sees it.
    if args.once {
        if let Some(outage) = relay.outage() {
            return Err(CliError::Check(format!(
                "target {} is unavailable: {} ({} event(s) deferred)",
                args.to, outage.last_error, report.deferred
            )));
        }
        if report.deferred > 0 {
            return Err(CliError::Check(format!(
                "target {} was unavailable: {} event(s) deferred",
                args.to, report.deferred
            )));
        }
    }
    Ok(())
}

/// Follows the running relay: the target's outage and, when `stats_every`
/// is set, the store's figures for the endpoint; logs totals now and then.
async fn watch<S, P>(
    relay: &Relay<S, P>,
    shared: &Shared,
    stats_every: Option<Duration>,
) -> std::convert::Infallible
where
    S: ClaimSource + Stats,
    P: Publisher,
{
    let m = relay.metrics();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = tokio::time::Instant::now();
    let mut next_stats = started;
    let mut next_report = time::instant_after(started, REPORT_EVERY);
    loop {
        tick.tick().await;
        let now = tokio::time::Instant::now();
        let outage = relay.outage();
        shared.update(|h| h.outage(outage.as_ref().map(|o| (o.since, o.last_error.clone()))));
        if let Some(every) = stats_every {
            if now >= next_stats {
                // A store slower than the interval counts as unavailable.
                let read = match tokio::time::timeout(every, relay.source().stats()).await {
                    Ok(Ok(stats)) => Ok(stats),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {every:?}")),
                };
                if let Err(e) = &read {
                    tracing::warn!(error = %e, "relay: cannot read the store's figures");
                }
                shared.update(|h| h.stats_read(read));
                next_stats = time::instant_after(tokio::time::Instant::now(), every);
            }
        }
        if now >= next_report {
            tracing::info!(
                published = m.published.load(Ordering::Relaxed),
                retried = m.retried.load(Ordering::Relaxed),
                failed = m.failed.load(Ordering::Relaxed),
                dead_lettered = m.dead_lettered.load(Ordering::Relaxed),
                deferred = m.deferred.load(Ordering::Relaxed),
                store_errors = m.store_errors.load(Ordering::Relaxed),
                target_down_since = outage.as_ref().map(|o| o.since.to_rfc3339()),
                "relay totals"
            );
            next_report = time::instant_after(now, REPORT_EVERY);
        }
    }
}
