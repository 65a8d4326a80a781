//! A Streams API record as DynamoDB JSON, to keep a malformed record as it came.

use aws_sdk_dynamodbstreams::types::Record;
use serde_json::{json, Value};

use crate::attr::stream_image_json;

/// The record in the shape a Lambda stream event carries it.
pub(crate) fn record_json(record: &Record) -> Value {
    let data = record.dynamodb();
    json!({
        "eventID": record.event_id(),
        "eventName": record.event_name().map(|n| n.as_str()),
        "eventSource": record.event_source(),
        "dynamodb": {
            "SequenceNumber": data.and_then(|d| d.sequence_number()),
            "Keys": data.and_then(|d| d.keys.as_ref()).map(stream_image_json),
            "NewImage": data.and_then(|d| d.new_image.as_ref()).map(stream_image_json),
        },
    })
}
