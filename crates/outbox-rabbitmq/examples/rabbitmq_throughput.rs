//! Publishes 100,000 small events in calls of 100, every confirm awaited,
//! into one bound durable queue, and prints the rate:
//! `cargo run --release -p outbox-rabbitmq --example rabbitmq_throughput`.

use std::time::Instant;

use lapin::options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use outbox_core::{Event, PublishRequest, Publisher};
use outbox_rabbitmq::{lapin, RabbitPublisher};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("OUTBOX_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let total: usize = 100_000;
    // Events per call (default 100): OUTBOX_BATCH.
    let batch: usize = std::env::var("OUTBOX_BATCH")
        .ok()
        .and_then(|b| b.parse().ok())
        .unwrap_or(100);
    let name = format!(
        "outbox.bench.{}",
        outbox_core::EventId::new().as_uuid().simple()
    );
    let publisher = RabbitPublisher::new(&url, &name)?.exchange_auto_delete(true);
    publisher.check().await?;
    // A durable queue, so persistent messages are written to disk.
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(name.as_str().into(), durable, FieldTable::default())
        .await?;
    channel
        .queue_bind(
            name.as_str().into(),
            name.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
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
        "rabbitmq: {total} events, {batch} a call, in {:.2} s = {:.0} events/s, {failed} failed (durable queue, persistent)",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    channel
        .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
        .await?;
    Ok(())
}
