//! Attribute helpers shared by every table of the crate: building values,
//! reading them back, and writing an item as DynamoDB JSON.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use serde_json::{json, Map, Value};

/// An item of the DynamoDB SDK.
pub(crate) type Item = HashMap<String, AttributeValue>;

pub(crate) fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

pub(crate) fn n(value: impl ToString) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

/// A string attribute; `None` when absent or of another type.
pub(crate) fn string<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    match item.get(name) {
        Some(AttributeValue::S(v)) => Some(v),
        _ => None,
    }
}

/// A number attribute read as an i64; `None` when absent, of another type or
/// out of range.
pub(crate) fn number(item: &Item, name: &str) -> Option<i64> {
    match item.get(name) {
        Some(AttributeValue::N(v)) => v.parse().ok(),
        _ => None,
    }
}

pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A duration in milliseconds, saturating at i64::MAX.
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

macro_rules! dynamodb_json {
    ($name:ident, $($attr:ident)::+) => {
        /// A value as DynamoDB JSON (`{"S": "..."}`), binary as base64.
        pub(crate) fn $name(v: &$($attr)::+) -> Value {
            use $($attr)::+ as A;
            let b64 = |b: &aws_smithy_types::Blob| {
                Value::String(aws_smithy_types::base64::encode(b.as_ref()))
            };
            match v {
                A::S(s) => json!({ "S": s }),
                A::N(n) => json!({ "N": n }),
                A::B(b) => json!({ "B": b64(b) }),
                A::Bool(b) => json!({ "BOOL": b }),
                A::Null(n) => json!({ "NULL": n }),
                A::Ss(ss) => json!({ "SS": ss }),
                A::Ns(ns) => json!({ "NS": ns }),
                A::Bs(bs) => json!({ "BS": bs.iter().map(b64).collect::<Vec<_>>() }),
                A::L(l) => json!({ "L": l.iter().map($name).collect::<Vec<_>>() }),
                A::M(m) => json!({ "M": m
                    .iter()
                    .map(|(k, v)| (k.clone(), $name(v)))
                    .collect::<Map<_, _>>() }),
                _ => json!({ "unknown": format!("{v:?}") }),
            }
        }
    };
}

dynamodb_json!(value_json, aws_sdk_dynamodb::types::AttributeValue);
dynamodb_json!(
    stream_value_json,
    aws_sdk_dynamodbstreams::types::AttributeValue
);

/// An item as DynamoDB JSON, keys sorted (serde_json's map is ordered).
pub(crate) fn item_json(item: &Item) -> Value {
    Value::Object(
        item.iter()
            .map(|(k, v)| (k.clone(), value_json(v)))
            .collect::<Map<_, _>>(),
    )
}

/// A stream image as DynamoDB JSON.
pub(crate) fn stream_image_json(
    image: &HashMap<String, aws_sdk_dynamodbstreams::types::AttributeValue>,
) -> Value {
    Value::Object(
        image
            .iter()
            .map(|(k, v)| (k.clone(), stream_value_json(v)))
            .collect::<Map<_, _>>(),
    )
}
