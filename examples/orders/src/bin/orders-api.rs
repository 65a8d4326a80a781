//! `OrdersApiFunction`: the Order service's HTTP API behind API Gateway
//! (HTTP API, payload v2), on DynamoDB: the order and its events in one
//! `TransactWriteItems`, the outbox table's stream feeding `PublishEvents`.
//!
//! Environment: `ORDERS_TABLE`, `OUTBOX_TABLE` (both required).

use lambda_http::{service_fn, Body, Error, Request, RequestExt, Response};
use orders::config::{required, ORDERS_TABLE_VAR, OUTBOX_TABLE_VAR};
use orders::store::dynamodb::{check_table, DynamoOrders};
use outbox_dynamodb::DynamoOutbox;

#[tokio::main]
async fn main() -> Result<(), Error> {
    outbox_lambda::init_logging();

    // Built once per execution environment; a missing variable, region,
    // credentials or table fails the init, naming it.
    let store = match init().await {
        Ok(store) => store,
        Err(e) => {
            eprintln!("orders-api: init failed: {e}");
            return Err(e);
        }
    };
    tracing::info!(
        orders = store.table(),
        outbox = store.outbox().table(),
        "OrdersApi ready"
    );

    lambda_http::run(service_fn(|request: Request| {
        let store = &store;
        async move {
            let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok());
            // The path as the client sent it, without the stage prefix.
            let path = request.raw_http_path();
            let answer = orders::api::handle(
                store,
                orders::api::Request {
                    method: request.method().as_str(),
                    path,
                    body: request.body().as_ref(),
                    if_match: header("if-match"),
                    correlation_id: header("x-correlation-id"),
                    traceparent: header("traceparent"),
                },
            )
            .await;
            let mut response = Response::builder()
                .status(answer.status)
                .header("content-type", "application/json");
            for (name, value) in &answer.headers {
                response = response.header(*name, value);
            }
            Ok::<_, Error>(response.body(Body::from(answer.body_text()))?)
        }
    }))
    .await
}

async fn init() -> Result<DynamoOrders, Error> {
    let orders_table = required(
        ORDERS_TABLE_VAR,
        "the DynamoDB table of orders (template: OrdersTable)",
    )?;
    let outbox_table = required(
        OUTBOX_TABLE_VAR,
        "the DynamoDB outbox table with its stream (template: OutboxTable)",
    )?;
    let config = outbox_lambda::aws_publisher::load_checked_config().await?;
    let client = aws_sdk_dynamodb::Client::new(&config);
    check_table(&client, &orders_table, ORDERS_TABLE_VAR).await?;
    check_table(&client, &outbox_table, OUTBOX_TABLE_VAR).await?;
    Ok(DynamoOrders::new(
        client.clone(),
        orders_table,
        DynamoOutbox::new(client, outbox_table),
    ))
}
