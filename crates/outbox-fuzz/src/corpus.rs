//! The seeds: the real fixtures already in the repository (stream events of
//! the Lambda handler's tests, the queue deliveries of the SQS consumer's
//! tests) and this crate's own (`corpus/`), built into the binary.

use serde_json::Value;

use crate::mutate::strings;

/// Lambda DynamoDB stream events, valid and malformed.
pub const LAMBDA_EVENTS: &[&str] = &[
    include_str!("../../outbox-lambda/tests/fixtures/insert_one_event.json"),
    include_str!("../../outbox-lambda/tests/fixtures/modify_several_events.json"),
    include_str!("../../outbox-lambda/tests/fixtures/remove.json"),
    include_str!("../../outbox-lambda/tests/fixtures/ttl_delete.json"),
    include_str!("../../outbox-lambda/tests/fixtures/malformed_bad_event_json.json"),
    include_str!("../../outbox-lambda/tests/fixtures/malformed_missing_new_image.json"),
    include_str!("../../outbox-lambda/tests/fixtures/malformed_missing_sequence_number.json"),
    include_str!("../../outbox-lambda/tests/fixtures/malformed_wrong_types.json"),
];

/// A structured-mode CloudEvent as `SqsPublisher` (and SNS raw delivery) sends it.
pub const CLOUDEVENT: &str = include_str!("../../outbox-sqs/tests/fixtures/cloudevent.json");
/// An EventBridge event whose `detail` is the CloudEvent.
pub const EVENTBRIDGE: &str =
    include_str!("../../outbox-sqs/tests/fixtures/eventbridge-event.json");
/// An SNS notification whose `Message` is the CloudEvent.
pub const SNS: &str = include_str!("../../outbox-sqs/tests/fixtures/sns-notification.json");

/// Polling-shape event items (DynamoDB JSON).
pub const POLLING_ITEMS: &[&str] = &[
    include_str!("../corpus/polling-item.json"),
    include_str!("../corpus/polling-item-dead.json"),
];

/// Seeds parsed, with their text and every string they hold.
#[derive(Debug, Clone)]
pub struct Seeds {
    pub docs: Vec<Value>,
    pub texts: Vec<Vec<u8>>,
    pub known: Vec<String>,
}

impl Seeds {
    pub fn new(docs: Vec<Value>) -> Self {
        let texts = docs.iter().map(|d| d.to_string().into_bytes()).collect();
        Self::with_texts(docs, texts)
    }

    /// Seeds kept with their text as written (whitespace and all).
    pub fn from_texts(texts: &[&str]) -> Self {
        let docs = texts
            .iter()
            .filter_map(|t| serde_json::from_str(t).ok())
            .collect();
        Self::with_texts(docs, texts.iter().map(|t| t.as_bytes().to_vec()).collect())
    }

    fn with_texts(docs: Vec<Value>, texts: Vec<Vec<u8>>) -> Self {
        let mut known = Vec::new();
        for d in &docs {
            strings(d, &mut known);
        }
        known.sort();
        known.dedup();
        Self { docs, texts, known }
    }

    pub fn text_slices(&self) -> Vec<&[u8]> {
        self.texts.iter().map(Vec::as_slice).collect()
    }
}

/// The records of every Lambda fixture, each a seed of its own.
pub fn lambda_records() -> Vec<Value> {
    LAMBDA_EVENTS
        .iter()
        .filter_map(|t| serde_json::from_str::<Value>(t).ok())
        .filter_map(|v| v.get("Records").and_then(Value::as_array).cloned())
        .flatten()
        .collect()
}

/// The new images of the Lambda fixtures: stream-shape outbox items.
pub fn stream_items() -> Vec<Value> {
    lambda_records()
        .iter()
        .filter_map(|r| r.pointer("/dynamodb/NewImage").cloned())
        .collect()
}

/// Every outbox event envelope the fixtures carry, as JSON values.
pub fn envelopes() -> Vec<Value> {
    let mut out = Vec::new();
    for item in stream_items().iter().chain(polling_items().iter()) {
        let entries = item
            .pointer("/events/L")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let single = item.pointer("/event/S").cloned();
        for entry in entries
            .iter()
            .filter_map(|e| e.get("S").cloned())
            .chain(single)
        {
            if let Some(event) = entry
                .as_str()
                .and_then(|s| serde_json::from_str::<Value>(s).ok())
            {
                out.push(event);
            }
        }
    }
    out
}

pub fn polling_items() -> Vec<Value> {
    POLLING_ITEMS
        .iter()
        .filter_map(|t| serde_json::from_str(t).ok())
        .collect()
}
