//! The demo on PostgreSQL: the services' tables next to the outbox in one
//! schema, relays as processes of this program, NATS JetStream or RabbitMQ
//! between the Order and the Shipping service.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use orders::store::postgres::PostgresStore;
use orders::store::ShipmentStore;
use outbox_core::{DeadLetterPolicy, Event, EventId, Stats, StoreError};
use outbox_nats::async_nats::{self, jetstream};
use outbox_nats::SubjectTemplate;
use outbox_postgres::PostgresOutbox;
use outbox_rabbitmq::lapin;
use outbox_registry::{DEFAULT_AMQP_EXCHANGE, DEFAULT_NATS_STREAM, DEFAULT_POSTGRES_SCHEMA};
use outbox_testkit::proxy::FaultProxy;
use sqlx::AssertSqlSafe;

use super::broker::{rabbit_error, rabbit_ready, NatsDeliveries, RabbitDeliveries, Received};
use super::processes::{RelayProcesses, RelaySettings};
use super::shop::{self, Audit, NewOrder, Shipped, Shop};
use super::{report, run_with, DemoArgs, RelayTask, Summary, DEFAULT_RATE, SOURCE};
use crate::target::TargetUrl;
use crate::CliError;

const CONSUMER: &str = orders::SHIPPING_CONSUMER;

/// The store as `--store postgres://...` names it.
#[derive(Debug, Clone)]
pub struct PgStore {
    /// The connection URL, without this program's options.
    pub url: String,
    pub schema: String,
    pub dead_letters: DeadLetterPolicy,
}

fn db(e: sqlx::Error) -> StoreError {
    StoreError::Backend(Box::new(e))
}

/// Both services' tables in the outbox's schema.
#[derive(Debug, Clone)]
pub struct PostgresShop {
    store: PostgresStore,
}

impl PostgresShop {
    /// Creates the outbox's tables (when missing) and the services' tables;
    /// refuses a schema that already holds events, so the summary can be
    /// checked against the tables afterwards.
    pub async fn new(outbox: PostgresOutbox) -> Result<Self, StoreError> {
        let shop = Self {
            store: PostgresStore::open(outbox).await?,
        };
        let existing: i64 = sqlx::query_scalar(shop.sql("SELECT count(*) FROM {s}.outbox"))
            .fetch_one(shop.outbox().pool())
            .await
            .map_err(db)?;
        if existing > 0 {
            return Err(StoreError::Config(format!(
                "schema {} already holds {existing} events; the demo needs a fresh one \
                 (name another with ?schema=NAME, or leave it out for a schema of the run's own)",
                shop.outbox().schema_name()
            )));
        }
        Ok(shop)
    }

    /// `sql` with `{s}` the quoted schema.
    fn sql(&self, sql: &str) -> AssertSqlSafe<String> {
        self.store.sql(sql)
    }
}

impl Shop for PostgresShop {
    type Outbox = PostgresOutbox;

    fn outbox(&self) -> PostgresOutbox {
        self.store.outbox().clone()
    }

    async fn relay_source(&self) -> Result<PostgresOutbox, StoreError> {
        Ok(self.store.outbox().clone())
    }

    async fn place_order(&self, order: &NewOrder) -> Result<Vec<Event>, StoreError> {
        shop::place(&self.store, order).await
    }

    async fn cancel_order(&self, order_id: &str) -> Result<Option<Event>, StoreError> {
        shop::cancel(&self.store, order_id).await
    }

    async fn ship(&self, events: &[Event]) -> Result<Vec<Shipped>, StoreError> {
        self.store.ship(events).await
    }

    async fn audit(&self, _written: &HashSet<EventId>) -> Result<Audit, StoreError> {
        let row: (i64, i64, i64, i64, i64, i64) = sqlx::query_as(self.sql(
            "SELECT (SELECT count(*) FROM {s}.orders),
                    (SELECT count(*) FROM {s}.outbox),
                    (SELECT count(*) FROM {s}.outbox_events WHERE status = 'published'),
                    (SELECT count(*) FROM {s}.outbox_events WHERE status = 'dead'),
                    (SELECT count(*) FROM {s}.inbox WHERE consumer = $1),
                    (SELECT count(*) FROM {s}.outbox_events AS o WHERE o.status != 'dead' AND NOT EXISTS
                        (SELECT 1 FROM {s}.inbox AS i
                         WHERE i.consumer = $1 AND i.event_id::text = o.id))",
        ))
        .bind(CONSUMER)
        .fetch_one(self.outbox().pool())
        .await
        .map_err(db)?;
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(Audit {
            orders: n(row.0),
            events_written: n(row.1),
            published: Some(n(row.2)),
            dead: n(row.3),
            delivered_unique: n(row.4),
            lost: n(row.5),
        })
    }
}

/// `scheme://[user@]HOST:PORT[/path][?query]` split around `HOST:PORT`.
struct ServerUrl<'a> {
    /// Up to and including `://` and the user part.
    head: &'a str,
    /// `HOST:PORT`, with the scheme's port when none is given.
    address: String,
    /// The path and query, if any.
    tail: &'a str,
}

fn split_server(url: &str, default_port: u16) -> Result<ServerUrl<'_>, CliError> {
    let bad = || {
        CliError::Usage(format!(
            "cannot find the server's host in {}",
            outbox_core::secret::redact_url(url)
        ))
    };
    let after_scheme = url.find("://").ok_or_else(bad)? + 3;
    let rest = &url[after_scheme..];
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let host_start = authority.rfind('@').map_or(0, |at| at + 1);
    let host_port = &authority[host_start..];
    if host_port.is_empty() {
        return Err(bad());
    }
    // A port follows the last `:`, unless that `:` is inside an IPv6 address.
    let has_port = host_port
        .rsplit_once(':')
        .is_some_and(|(_, port)| !port.contains(']') && !port.is_empty());
    let address = if has_port {
        host_port.to_owned()
    } else {
        format!("{host_port}:{default_port}")
    };
    Ok(ServerUrl {
        head: &url[..after_scheme + host_start],
        address,
        tail: &rest[end..],
    })
}

/// A short id that names what one run creates.
fn run_id() -> String {
    let uuid = EventId::new().as_uuid().simple().to_string();
    uuid[uuid.len() - 8..].to_owned()
}

/// The broker side of a run: what was created, how to read it back.
enum Broker {
    Nats {
        js: jetstream::Context,
        stream: String,
        /// Created by this run, deleted afterwards.
        own_stream: bool,
        consumer: String,
        /// The stream's last sequence before the run.
        before: u64,
    },
    Rabbit {
        connection: lapin::Connection,
        channel: lapin::Channel,
        exchange: String,
        own_exchange: bool,
        queue: String,
    },
}

/// How long JetStream keeps a message id to drop a re-published event:
/// longer than any demo run, so each event is stored once.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(30 * 60);

pub async fn run(store: PgStore, args: &DemoArgs) -> Result<(), CliError> {
    let to = match &args.to {
        Some(to @ (TargetUrl::Nats { .. } | TargetUrl::Amqp { .. })) => to.clone(),
        other => {
            return Err(CliError::Usage(format!(
                "the demo on PostgreSQL publishes to NATS or RabbitMQ: use --to nats://HOST:PORT \
                 or --to amqp://USER:PASS@HOST:PORT/VHOST{}",
                other
                    .as_ref()
                    .map(|t| format!(", not {t}"))
                    .unwrap_or_default()
            )))
        }
    };
    let id = run_id();
    let own_schema = store.schema == DEFAULT_POSTGRES_SCHEMA;
    let schema = if own_schema {
        format!("outbox_demo_{id}")
    } else {
        store.schema.clone()
    };
    let outbox = PostgresOutbox::connect(&store.url)
        .await?
        .schema(&schema)?
        .dead_letter_policy(store.dead_letters);
    let result = match PostgresShop::new(outbox.clone()).await {
        Ok(shop) => run_on(shop, &store, &schema, own_schema, &to, &id, args).await,
        Err(e) => Err(e.into()),
    };
    if own_schema {
        let drop = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
        if let Err(e) = sqlx::raw_sql(AssertSqlSafe(drop))
            .execute(outbox.pool())
            .await
        {
            eprintln!("note: could not drop schema {schema}: {e}");
        }
    }
    result
}

async fn run_on(
    shop: PostgresShop,
    store: &PgStore,
    schema: &str,
    own_schema: bool,
    to: &TargetUrl,
    id: &str,
    args: &DemoArgs,
) -> Result<(), CliError> {
    // The relays' store URL: the user's, with this run's schema.
    let mut store_url = format!(
        "{}{}schema={schema}",
        store.url,
        if store.url.contains('?') { '&' } else { '?' }
    );
    if store.dead_letters == DeadLetterPolicy::Park {
        store_url.push_str("&dead_letters=park");
    }
    let received = Received::default();
    let (broker, server, default_port) = match to {
        TargetUrl::Nats {
            server,
            stream,
            subject,
        } => (
            setup_nats(server, stream, subject, id).await?,
            server.as_str(),
            4222,
        ),
        TargetUrl::Amqp { uri, exchange } => (
            setup_rabbit(uri, exchange, id).await?,
            uri.as_str(),
            if uri.starts_with("amqps") { 5671 } else { 5672 },
        ),
        _ => return Err(CliError::Usage(format!("{to} is not NATS or RabbitMQ"))),
    };
    let outcome = run_broker(
        shop,
        &broker,
        &received,
        &store_url,
        server,
        default_port,
        to,
        args,
    )
    .await;
    let mut kept = cleanup(&broker).await;
    if !own_schema {
        kept.push(format!(
            "schema kept          {schema} (tables orders, outbox, shipments, inbox)"
        ));
    }
    let (summary, verdict) = outcome?;
    // The summary first, then whichever check failed.
    report(&summary, args, &kept).and(verdict)
}

/// Runs the services and the relays, then checks the outbox table and the
/// broker against the summary.
#[allow(clippy::too_many_arguments)]
async fn run_broker(
    shop: PostgresShop,
    broker: &Broker,
    received: &Received,
    store_url: &str,
    server: &str,
    default_port: u16,
    to: &TargetUrl,
    args: &DemoArgs,
) -> Result<(Summary, Result<(), CliError>), CliError> {
    let server_url = split_server(server, default_port)?;
    // With chaos the relays reach the broker through a proxy that can cut them off.
    let proxy = if args.chaos {
        let upstream = tokio::net::lookup_host(server_url.address.as_str())
            .await
            .ok()
            .and_then(|mut found| found.next())
            .ok_or_else(|| {
                CliError::Usage(format!(
                    "cannot resolve the broker's address {}",
                    server_url.address
                ))
            })?;
        Some(
            FaultProxy::start(upstream)
                .await
                .map_err(|e| CliError::Check(format!("cannot start the fault proxy: {e}")))?,
        )
    } else {
        None
    };
    let relay_server = match &proxy {
        Some(p) => format!("{}{}{}", server_url.head, p.addr(), server_url.tail),
        None => server.to_owned(),
    };
    let relay_target = match (to, broker) {
        (
            TargetUrl::Nats { subject, .. },
            Broker::Nats {
                stream, own_stream, ..
            },
        ) => {
            let subject = own_subject(subject, stream, *own_stream);
            format!(
                "{relay_server}?stream={stream}&subject={}",
                subject.as_str()
            )
        }
        (_, Broker::Rabbit { exchange, .. }) => format!("{relay_server}?exchange={exchange}"),
        _ => return Err(CliError::Usage(format!("{to} is not NATS or RabbitMQ"))),
    };
    let exe = std::env::current_exe()
        .map_err(|e| CliError::Check(format!("cannot find this program to run relays: {e}")))?;
    let logs = tempfile::tempdir()
        .map_err(|e| CliError::Usage(format!("cannot make a temporary directory: {e}")))?;
    let processes = RelayProcesses::new(RelaySettings {
        exe,
        store: store_url.to_owned(),
        target: relay_target,
        source: SOURCE.to_owned(),
        count: args.relays,
        logs: logs.path().to_owned(),
        proxy,
    });
    let broker_cuts = processes.cuts();
    let start = move |run| -> RelayTask { Box::pin(processes.run(run)) };
    let mut summary = match broker {
        Broker::Nats {
            js,
            stream,
            consumer,
            ..
        } => {
            let consumer = js
                .get_stream(stream)
                .await
                .map_err(|e| nats_check("stream info", e))?
                .get_consumer(consumer)
                .await
                .map_err(|e| nats_check("consumer info", e))?;
            let deliveries = NatsDeliveries::new(consumer, received.clone());
            run_with(shop.clone(), deliveries, start, DEFAULT_RATE, args).await?
        }
        Broker::Rabbit {
            connection, queue, ..
        } => {
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| rabbit_error("channel.open", e))?;
            let deliveries = RabbitDeliveries::new(channel, queue, received.clone()).await?;
            run_with(shop.clone(), deliveries, start, DEFAULT_RATE, args).await?
        }
    };
    summary.relays = Some(args.relays);
    summary.broker_cuts = args.chaos.then(|| broker_cuts.load(Ordering::Relaxed));
    let verdict = check(&shop, &summary, broker, received).await;
    Ok((summary, verdict))
}

/// The run's subject template: the user's, or for a stream of the run's
/// own, one under its name (the default subjects may be another stream's).
fn own_subject(subject: &SubjectTemplate, stream: &str, own_stream: bool) -> SubjectTemplate {
    if !own_stream || subject.as_str() != outbox_nats::DEFAULT_SUBJECT_TEMPLATE {
        return subject.clone();
    }
    let prefix = stream.to_ascii_lowercase();
    SubjectTemplate::parse(&format!("{prefix}.{{aggregatetype}}.{{type}}"))
        .unwrap_or_else(|_| subject.clone())
}

fn nats_check(what: &str, e: impl std::fmt::Display) -> CliError {
    CliError::Check(format!("JetStream {what}: {e}"))
}

/// Creates (or finds) the stream and a durable pull consumer on it.
async fn setup_nats(
    server: &str,
    stream: &str,
    subject: &SubjectTemplate,
    id: &str,
) -> Result<Broker, CliError> {
    let client = async_nats::connect(server)
        .await
        .map_err(|e| CliError::Check(format!("cannot connect to NATS at {server}: {e}")))?;
    let js = jetstream::new(client);
    let own_stream = stream == DEFAULT_NATS_STREAM;
    let stream = if own_stream {
        format!("OUTBOX_DEMO_{}", id.to_ascii_uppercase())
    } else {
        stream.to_owned()
    };
    let subject = own_subject(subject, &stream, own_stream);
    let mut handle = js
        .get_or_create_stream(jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![subject.wildcard()],
            duplicate_window: DUPLICATE_WINDOW,
            // Left behind only if the demo is killed: gone within a day.
            max_age: if own_stream {
                Duration::from_secs(24 * 3600)
            } else {
                Duration::ZERO
            },
            ..Default::default()
        })
        .await
        .map_err(|e| nats_check(&format!("stream {stream}"), e))?;
    let before = handle
        .info()
        .await
        .map_err(|e| nats_check("stream info", e))?
        .state
        .last_sequence;
    let consumer = format!("shipping_{id}");
    handle
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some(consumer.clone()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(10),
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: before + 1,
            },
            filter_subject: subject.wildcard(),
            inactive_threshold: Duration::from_secs(3600),
            ..Default::default()
        })
        .await
        .map_err(|e| nats_check("create consumer", e))?;
    Ok(Broker::Nats {
        js,
        stream,
        own_stream,
        consumer,
        before,
    })
}

/// Declares the exchange (as the relays' publisher does) and a queue of
/// the run's own bound to everything on it.
async fn setup_rabbit(uri: &str, exchange: &str, id: &str) -> Result<Broker, CliError> {
    use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    let connection = lapin::Connection::connect(uri, lapin::ConnectionProperties::default())
        .await
        .map_err(|e| CliError::Check(format!("cannot connect to RabbitMQ: {e}")))?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| rabbit_error("channel.open", e))?;
    let own_exchange = exchange == DEFAULT_AMQP_EXCHANGE;
    let exchange = if own_exchange {
        format!("outbox-demo-{id}")
    } else {
        exchange.to_owned()
    };
    channel
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| rabbit_error(&format!("exchange.declare {exchange}"), e))?;
    let queue = format!("outbox-demo-{id}-shipping");
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| rabbit_error("queue.declare", e))?;
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| rabbit_error("queue.bind", e))?;
    Ok(Broker::Rabbit {
        connection,
        channel,
        exchange,
        own_exchange,
        queue,
    })
}

/// The outbox table and the broker agree with the summary.
async fn check(
    shop: &PostgresShop,
    summary: &Summary,
    broker: &Broker,
    received: &Received,
) -> Result<(), CliError> {
    let stats = shop.outbox().stats().await?;
    let mut broken = Vec::new();
    if stats.pending > 0 {
        broken.push(format!(
            "the outbox still holds {} pending events",
            stats.pending
        ));
    }
    if stats.published != summary.events_published || stats.dead != summary.dead_lettered {
        broken.push(format!(
            "the outbox table counts {} published and {} dead, the summary {} and {}",
            stats.published, stats.dead, summary.events_published, summary.dead_lettered
        ));
    }
    if stats.published + stats.dead != summary.events_written {
        broken.push(format!(
            "published {} + dead {} != {} events written",
            stats.published, stats.dead, summary.events_written
        ));
    }
    // A dead-lettered event may have reached the broker before it was given up on.
    let published = summary.events_published;
    let within = |n: u64| (published..=published + summary.dead_lettered).contains(&n);
    let ids = received.ids();
    let distinct = ids.len() as u64;
    let foreign: i64 = sqlx::query_scalar(shop.sql(
        "SELECT count(*) FROM unnest($1::text[]) AS r(id)
         WHERE NOT EXISTS (SELECT 1 FROM {s}.outbox AS o WHERE o.id = r.id)",
    ))
    .bind(ids)
    .fetch_one(shop.outbox().pool())
    .await?;
    if !within(distinct) {
        broken.push(format!(
            "the consumer received {distinct} distinct events, the outbox published {published}"
        ));
    }
    if foreign > 0 {
        broken.push(format!(
            "the consumer received {foreign} events the outbox never wrote"
        ));
    }
    match broker {
        Broker::Nats {
            js,
            stream,
            consumer,
            before,
            ..
        } => {
            let mut handle = js
                .get_stream(stream)
                .await
                .map_err(|e| nats_check("stream info", e))?;
            let info = handle
                .info()
                .await
                .map_err(|e| nats_check("stream info", e))?;
            let stored = info.state.last_sequence.saturating_sub(*before);
            if !within(stored) {
                broken.push(format!(
                    "stream {stream} stored {stored} messages in this run, the outbox published {published}"
                ));
            }
            let info = handle
                .consumer_info(consumer)
                .await
                .map_err(|e| nats_check("consumer info", e))?;
            if info.num_pending > 0 || info.num_ack_pending > 0 {
                broken.push(format!(
                    "consumer {consumer} still has {} undelivered and {} unacknowledged messages",
                    info.num_pending, info.num_ack_pending
                ));
            }
        }
        Broker::Rabbit { channel, queue, .. } => {
            let ready = rabbit_ready(channel, queue).await?;
            if ready > 0 {
                broken.push(format!("queue {queue} still holds {ready} messages"));
            }
        }
    }
    if broken.is_empty() {
        Ok(())
    } else {
        Err(CliError::Check(format!(
            "the tables or the broker disagree with the summary: {}",
            broken.join("; ")
        )))
    }
}

/// Deletes what the run created on the broker; says what it keeps.
async fn cleanup(broker: &Broker) -> Vec<String> {
    let mut kept = Vec::new();
    match broker {
        Broker::Nats {
            js,
            stream,
            own_stream,
            consumer,
            ..
        } => {
            if *own_stream {
                if let Err(e) = js.delete_stream(stream).await {
                    eprintln!("note: could not delete stream {stream}: {e}");
                }
            } else {
                if let Ok(handle) = js.get_stream(stream).await {
                    if let Err(e) = handle.delete_consumer(consumer).await {
                        eprintln!("note: could not delete consumer {consumer}: {e}");
                    }
                }
                kept.push(format!("stream kept          {stream}"));
            }
        }
        Broker::Rabbit {
            connection,
            channel,
            exchange,
            own_exchange,
            queue,
        } => {
            use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
            if let Err(e) = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
            {
                eprintln!("note: could not delete queue {queue}: {e}");
            }
            if *own_exchange {
                if let Err(e) = channel
                    .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                    .await
                {
                    eprintln!("note: could not delete exchange {exchange}: {e}");
                }
            } else {
                kept.push(format!("exchange kept        {exchange}"));
            }
            let _ = connection.close(200, "demo done".into()).await;
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_server_urls_around_the_address() {
        let u = split_server("amqp://guest:guest@127.0.0.1:5672/%2f", 5672).expect("url");
        assert_eq!(
            (u.head, u.address.as_str(), u.tail),
            ("amqp://guest:guest@", "127.0.0.1:5672", "/%2f")
        );
        let u = split_server("nats://127.0.0.1", 4222).expect("url");
        assert_eq!(
            (u.head, u.address.as_str(), u.tail),
            ("nats://", "127.0.0.1:4222", "")
        );
        let u = split_server("nats://u:p@h:1?x=y", 4222).expect("url");
        assert_eq!(
            (u.head, u.address.as_str(), u.tail),
            ("nats://u:p@", "h:1", "?x=y")
        );
        assert!(split_server("nats://", 4222).is_err());
    }
}
