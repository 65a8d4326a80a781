//! `ShippingFunction`: the Shipping service, invoked by the `ShippingQueue`
//! event source mapping (EventBridge rule -> SQS -> Lambda). Each message is
//! applied once through outbox-lambda's consumer wrapper (inbox record and
//! shipment in one `TransactWriteItems`); failures are reported as batch
//! item failures (`ReportBatchItemFailures`), so only they come back.
//!
//! Environment: `SHIPMENTS_TABLE`, `INBOX_TABLE` (both required).

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use lambda_runtime::{service_fn, Error, LambdaEvent};
use orders::config::{required, INBOX_TABLE_VAR, SHIPMENTS_TABLE_VAR};
use orders::store::dynamodb::{check_table, DynamoShipments, ShippingHandler};
use outbox_dynamodb::DynamoInbox;
use outbox_lambda::IdempotentConsumer;

#[tokio::main]
async fn main() -> Result<(), Error> {
    outbox_lambda::init_logging();

    // Built once per execution environment; a missing variable, region,
    // credentials or table fails the init, naming it.
    let consumer = match init().await {
        Ok(consumer) => consumer,
        Err(e) => {
            eprintln!("shipping: init failed: {e}");
            return Err(e);
        }
    };
    tracing::info!("Shipping ready");

    lambda_runtime::run(service_fn(|event: LambdaEvent<SqsEvent>| {
        let consumer = &consumer;
        async move {
            let response = consumer.handle_sqs(&event.payload).await;
            tracing::info!(
                messages = event.payload.records.len(),
                failed = response.batch_item_failures.len(),
                "shipping batch handled"
            );
            Ok::<SqsBatchResponse, Error>(response)
        }
    }))
    .await
}

async fn init() -> Result<IdempotentConsumer<ShippingHandler>, Error> {
    let shipments_table = required(
        SHIPMENTS_TABLE_VAR,
        "the DynamoDB table of shipments (template: ShipmentsTable)",
    )?;
    let inbox_table = required(
        INBOX_TABLE_VAR,
        "the Shipping service's DynamoDB inbox table (template: ShippingInboxTable)",
    )?;
    let config = outbox_lambda::aws_publisher::load_checked_config().await?;
    let client = aws_sdk_dynamodb::Client::new(&config);
    check_table(&client, &shipments_table, SHIPMENTS_TABLE_VAR).await?;
    check_table(&client, &inbox_table, INBOX_TABLE_VAR).await?;
    Ok(IdempotentConsumer::new(
        orders::SHIPPING_CONSUMER,
        DynamoInbox::new(client.clone(), inbox_table),
        ShippingHandler::new(DynamoShipments::new(client, shipments_table)),
    ))
}
