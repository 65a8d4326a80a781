//! One target per decoder of outside data.

pub mod delivery;
pub mod items;
pub mod postgres;
pub mod sqlite;
pub mod stream;

use std::borrow::Cow;

use crate::runner::{run, Options, Stats};

/// Bytes as the text a `&str` decoder gets: invalid UTF-8 becomes U+FFFD,
/// as a lossy transport would hand it over.
pub fn lossy(input: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(input)
}

/// Every decoder, by its `--only` name.
pub const NAMES: [&str; 10] = [
    "lambda-stream",
    "streams-api",
    "item-stream-shape",
    "item-polling-shape",
    "cloudevent",
    "sqs-delivery",
    "sns-delivery",
    "eventbridge-delivery",
    "sqlite-rows",
    "postgres-rows",
];

/// Runs the decoder named `name`.
pub fn run_named(name: &str, options: &Options) -> Result<Stats, String> {
    use delivery::{Carrier, CloudEvent, Delivery};
    Ok(match name {
        "lambda-stream" => run(
            &stream::LambdaStream::new().map_err(|e| e.to_string())?,
            options,
        ),
        "streams-api" => run(&stream::StreamsApi::new(), options),
        "item-stream-shape" => run(&items::StreamItem::new(), options),
        "item-polling-shape" => run(&items::PollingItem::new(), options),
        "cloudevent" => run(&CloudEvent::new(), options),
        "sqs-delivery" => run(&Delivery::new(Carrier::Sqs), options),
        "sns-delivery" => run(&Delivery::new(Carrier::Sns), options),
        "eventbridge-delivery" => run(&Delivery::new(Carrier::EventBridge), options),
        "sqlite-rows" => run(&sqlite::SqliteRows::new()?, options),
        "postgres-rows" => run(&postgres::PostgresRows::new()?, options),
        other => {
            return Err(format!(
                "no decoder named `{other}`; known: {}",
                NAMES.join(", ")
            ))
        }
    })
}
