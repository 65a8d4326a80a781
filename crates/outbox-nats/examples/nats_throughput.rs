//! Publishes 100,000 small events in calls of 100, every ack awaited, and
//! prints the rate: `cargo run --release -p outbox-nats --example nats_throughput`.

use std::time::Instant;

use outbox_core::{Event, PublishRequest, Publisher};
use outbox_nats::{async_nats, NatsPublisher, SubjectTemplate};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("OUTBOX_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let total: usize = 100_000;
    // Events per call (default 100): OUTBOX_BATCH.
    let batch: usize = std::env::var("OUTBOX_BATCH")
        .ok()
        .and_then(|b| b.parse().ok())
        .unwrap_or(100);
    let stream = format!(
        "outbox_bench_{}",
        outbox_core::EventId::new().as_uuid().simple()
    );
    let publisher = NatsPublisher::connect(&url, &stream)
        .await?
        .subject(SubjectTemplate::parse(&format!(
            "{stream}.{{aggregatetype}}.{{type}}"
        ))?)
        .stream_config(async_nats::jetstream::stream::Config {
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        });
    publisher.check().await?;
    let events: Vec<Event> = (0..total)
        .map(|i| {
            Event::builder("Order", format!("o-{i}"), 1, "OrderPlaced")
                .payload(&serde_json::json!({ "n": i }))
                .build()
        })
        .collect::<Result<_, _>>()?;
    let start = Instant::now();
    let mut failed = 0;
    for chunk in events.chunks(batch.max(1)) {
        failed += publisher
            .publish(PublishRequest::new(chunk))
            .await
            .iter()
            .filter(|r| r.is_err())
            .count();
    }
    let elapsed = start.elapsed();
    println!(
        "nats: {total} events, {batch} a call, in {:.2} s = {:.0} events/s, {failed} failed (file storage)",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    async_nats::jetstream::new(publisher.client().clone())
        .delete_stream(&stream)
        .await?;
    Ok(())
}
