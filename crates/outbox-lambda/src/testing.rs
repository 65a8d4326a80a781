//! Lambda DynamoDB stream events built from outbox events, shaped as Lambda
//! delivers them, for tests and local runs (`cargo lambda invoke --data-file`).

use outbox_core::Event;
use outbox_dynamodb::item::{
    self, AGGREGATE_ID, AGGREGATE_TYPE, COMMITTED_AT, EVENTS, PK, VERSION,
};
use outbox_dynamodb::LambdaStreamEvent;
use serde_json::{json, Value};

/// The stream the records pretend to come from.
pub const STREAM_ARN: &str =
    "arn:aws:dynamodb:us-east-1:123456789012:table/Outbox/stream/2026-11-22T00:00:00.000";

/// An INSERT (or, with `kind`, MODIFY) record of the outbox item carrying
/// `events`, one transaction of one aggregate. Returns `None` for an empty
/// slice or an event that cannot be encoded.
pub fn stream_record(kind: &str, sequence_number: &str, events: &[Event]) -> Option<Value> {
    let last = events.last()?;
    let key = item::aggregate_key(&last.aggregate_type, &last.aggregate_id).ok()?;
    let list = events
        .iter()
        .map(|e| item::encode_event(e).map(|s| json!({ "S": s })))
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    let committed_at = last.occurred_at.timestamp_millis();
    let image = json!({
        PK: { "S": key },
        AGGREGATE_TYPE: { "S": last.aggregate_type },
        AGGREGATE_ID: { "S": last.aggregate_id },
        VERSION: { "N": last.aggregate_version.to_string() },
        EVENTS: { "L": list },
        COMMITTED_AT: { "N": committed_at.to_string() },
    });
    Some(json!({
        "eventID": format!("{:032x}", last.id.as_uuid().as_u128()),
        "eventName": kind,
        "eventVersion": "1.1",
        "eventSource": "aws:dynamodb",
        "awsRegion": "us-east-1",
        "dynamodb": {
            "ApproximateCreationDateTime": committed_at / 1000,
            "Keys": { PK: { "S": key } },
            "NewImage": image,
            "SequenceNumber": sequence_number,
            "SizeBytes": image.to_string().len(),
            "StreamViewType": "NEW_IMAGE",
        },
        "eventSourceARN": STREAM_ARN,
    }))
}

/// A Lambda stream event (`{"Records": [...]}`) as JSON.
pub fn stream_event_json(records: impl IntoIterator<Item = Value>) -> String {
    json!({ "Records": records.into_iter().collect::<Vec<_>>() }).to_string()
}

/// A Lambda stream event, ready for the handler.
pub fn stream_event(records: impl IntoIterator<Item = Value>) -> LambdaStreamEvent {
    let json = stream_event_json(records);
    // Built from JSON values just now, so it always parses.
    LambdaStreamEvent::from_json(&json).unwrap_or(LambdaStreamEvent {
        records: Vec::new(),
    })
}
