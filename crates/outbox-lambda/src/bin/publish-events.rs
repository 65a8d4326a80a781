//! `PublishEvents`: relays outbox events from a DynamoDB stream to
//! EventBridge, SQS or SNS, answering with a partial batch response.
//!
//! Configured by environment (see the crate README): `OUTBOX_TARGET`,
//! `OUTBOX_SOURCE`, `OUTBOX_DEAD_LETTER_TABLE`, `OUTBOX_ENTRY_RETRIES`,
//! `OUTBOX_MAX_ENTRY_BYTES`.

use lambda_runtime::{service_fn, Error, LambdaEvent};
use outbox_dynamodb::LambdaStreamEvent;
use outbox_lambda::{publish_events_handler, StreamBatchResponse, StreamRelaySettings};

#[tokio::main]
async fn main() -> Result<(), Error> {
    outbox_lambda::init_logging();

    // Built once per execution environment, before the first event.
    let settings = StreamRelaySettings::from_env()?;
    // A missing region or credentials, or a bus or queue that does not
    // exist, fails the init, naming the setting.
    let config = outbox_lambda::aws_publisher::load_checked_config().await?;
    let handler = publish_events_handler(&config, &settings).await?;
    tracing::info!(target = %settings.target, "PublishEvents ready");

    lambda_runtime::run(service_fn(|event: LambdaEvent<LambdaStreamEvent>| {
        let handler = &handler;
        async move {
            // Stop starting calls in time to answer before Lambda's timeout,
            // naming the first unsettled record, so a timeout never replays
            // the whole batch.
            let deadline = outbox_lambda::deadline_from_epoch_ms(event.context.deadline);
            let report = handler.process_until(&event.payload, deadline).await;
            tracing::info!(
                records = report.records,
                published = report.published,
                ignored = report.ignored,
                malformed = report.malformed,
                dead_lettered = report.dead_lettered,
                retries = report.retries,
                unfinished = report.unfinished,
                retry_from = report.response.retry_sequence_number(),
                "stream batch handled"
            );
            outbox_lambda::emf::emit(&outbox_lambda::emf::stream_metrics(&report));
            Ok::<StreamBatchResponse, Error>(report.response)
        }
    }))
    .await
}
