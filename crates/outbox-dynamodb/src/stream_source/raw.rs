//! A Streams API record as DynamoDB JSON, to keep a malformed record as it came.

use aws_sdk_dynamodbstreams::types::{AttributeValue, Record};
use serde_json::{json, Map, Value};

fn attribute(v: &AttributeValue) -> Value {
    let b64 =
        |b: &aws_smithy_types::Blob| Value::String(aws_smithy_types::base64::encode(b.as_ref()));
    match v {
        AttributeValue::S(s) => json!({ "S": s }),
        AttributeValue::N(n) => json!({ "N": n }),
        AttributeValue::B(b) => json!({ "B": b64(b) }),
        AttributeValue::Bool(b) => json!({ "BOOL": b }),
        AttributeValue::Null(n) => json!({ "NULL": n }),
        AttributeValue::Ss(ss) => json!({ "SS": ss }),
        AttributeValue::Ns(ns) => json!({ "NS": ns }),
        AttributeValue::Bs(bs) => json!({ "BS": bs.iter().map(b64).collect::<Vec<_>>() }),
        AttributeValue::L(l) => json!({ "L": l.iter().map(attribute).collect::<Vec<_>>() }),
        AttributeValue::M(m) => json!({ "M": image(m) }),
        _ => json!({ "unknown": format!("{v:?}") }),
    }
}

fn image(m: &std::collections::HashMap<String, AttributeValue>) -> Value {
    Value::Object(
        m.iter()
            .map(|(k, v)| (k.clone(), attribute(v)))
            .collect::<Map<_, _>>(),
    )
}

/// The record in the shape a Lambda stream event carries it.
pub(crate) fn record_json(record: &Record) -> String {
    let data = record.dynamodb();
    let value = json!({
        "eventID": record.event_id(),
        "eventName": record.event_name().map(|n| n.as_str()),
        "eventSource": record.event_source(),
        "dynamodb": {
            "SequenceNumber": data.and_then(|d| d.sequence_number()),
            "Keys": data.and_then(|d| d.keys.as_ref()).map(image),
            "NewImage": data.and_then(|d| d.new_image.as_ref()).map(image),
        },
    });
    value.to_string()
}
