//! Stream records of the outbox table, decoded into the events they carry.
//!
//! Two shapes arrive: the JSON of a Lambda DynamoDB stream event
//! (`{"Records": [...]}`), and the Streams API's `GetRecords` records. INSERT
//! and MODIFY of an outbox item carry that transaction's events in their new
//! image; REMOVE (including TTL deletions) and unknown event names carry none.
//! A malformed record is an error naming what is wrong, never a panic.

use std::borrow::Cow;
use std::collections::HashMap;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::item::{Image, OutboxItem};

/// What one stream record means to the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A transaction's events for one aggregate, in version order.
    Events(OutboxItem),
    /// A record with nothing to publish (REMOVE, TTL deletion, unknown kind).
    Ignored { reason: String },
}

/// One decoded record, with its position in the shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRecord {
    /// The record's sequence number: what a partial batch response names and
    /// what a checkpoint records.
    pub sequence_number: String,
    pub change: Change,
}

/// A record that cannot be read. It carries the sequence number when the
/// record had one, so the caller can dead-letter it and go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed stream record{}: {reason}", sequence_number.as_deref().map(|s| format!(" {s}")).unwrap_or_default())]
pub struct DecodeError {
    pub sequence_number: Option<String>,
    pub reason: String,
}

impl DecodeError {
    fn new(sequence_number: Option<&str>, reason: impl Into<String>) -> Self {
        Self {
            sequence_number: sequence_number.map(str::to_owned),
            reason: reason.into(),
        }
    }
}

fn change(
    kind: Option<&str>,
    image: Option<&impl Image>,
    seq: &str,
) -> Result<Change, DecodeError> {
    match kind {
        Some("INSERT") | Some("MODIFY") => {
            let image = image.ok_or_else(|| {
                DecodeError::new(
                    Some(seq),
                    "no NewImage: the stream must use NEW_IMAGE or NEW_AND_OLD_IMAGES",
                )
            })?;
            OutboxItem::decode(image)
                .map(Change::Events)
                .map_err(|e| DecodeError::new(Some(seq), e.to_string()))
        }
        Some("REMOVE") => Ok(Change::Ignored {
            reason: "REMOVE carries no events".to_owned(),
        }),
        Some(other) => Ok(Change::Ignored {
            reason: format!("event name `{other}` carries no events"),
        }),
        None => Err(DecodeError::new(Some(seq), "eventName is missing")),
    }
}

// ---- The Lambda event shape ---------------------------------------------------

/// A Lambda DynamoDB stream event, with each record kept raw so one malformed
/// record does not hide the others.
#[derive(Debug, Deserialize)]
pub struct LambdaStreamEvent {
    #[serde(rename = "Records")]
    pub records: Vec<Box<RawValue>>,
}

impl LambdaStreamEvent {
    pub fn from_json(json: &str) -> Result<Self, DecodeError> {
        serde_json::from_str(json)
            .map_err(|e| DecodeError::new(None, format!("not a DynamoDB stream event: {e}")))
    }
}

#[derive(Deserialize)]
struct LambdaRecord<'a> {
    #[serde(rename = "eventName", borrow)]
    event_name: Option<Cow<'a, str>>,
    #[serde(borrow)]
    dynamodb: Option<LambdaStreamData<'a>>,
}

#[derive(Deserialize)]
struct LambdaStreamData<'a> {
    #[serde(rename = "SequenceNumber", borrow)]
    sequence_number: Option<Cow<'a, str>>,
    #[serde(rename = "NewImage")]
    new_image: Option<LambdaImage>,
}

/// Only the attributes the outbox reads; others are skipped unparsed.
#[derive(Deserialize)]
struct LambdaImage {
    aggregate_type: Option<JsonAttr>,
    aggregate_id: Option<JsonAttr>,
    version: Option<JsonAttr>,
    events: Option<JsonAttr>,
}

/// A DynamoDB JSON attribute value (`{"S": ".."}`, `{"N": ".."}`, `{"L": [..]}`).
#[derive(Deserialize)]
enum JsonAttr {
    S(String),
    N(String),
    L(Vec<JsonAttr>),
}

impl LambdaImage {
    fn get(&self, name: &str) -> Option<&JsonAttr> {
        match name {
            crate::item::AGGREGATE_TYPE => self.aggregate_type.as_ref(),
            crate::item::AGGREGATE_ID => self.aggregate_id.as_ref(),
            crate::item::VERSION => self.version.as_ref(),
            crate::item::EVENTS => self.events.as_ref(),
            _ => None,
        }
    }
}

impl Image for LambdaImage {
    fn string(&self, name: &str) -> Result<Option<&str>, String> {
        match self.get(name) {
            None => Ok(None),
            Some(JsonAttr::S(s)) => Ok(Some(s)),
            Some(_) => Err("is not a string (S)".to_owned()),
        }
    }

    fn number(&self, name: &str) -> Result<Option<&str>, String> {
        match self.get(name) {
            None => Ok(None),
            Some(JsonAttr::N(n)) => Ok(Some(n)),
            Some(_) => Err("is not a number (N)".to_owned()),
        }
    }

    fn string_list(&self, name: &str) -> Result<Option<Vec<&str>>, String> {
        match self.get(name) {
            None => Ok(None),
            Some(JsonAttr::L(list)) => list
                .iter()
                .map(|v| match v {
                    JsonAttr::S(s) => Ok(s.as_str()),
                    _ => Err("has an entry that is not a string (S)".to_owned()),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err("is not a list (L)".to_owned()),
        }
    }
}

/// Decodes one record of a Lambda stream event.
pub fn decode_lambda_record(raw: &RawValue) -> Result<StreamRecord, DecodeError> {
    let record: LambdaRecord<'_> = serde_json::from_str(raw.get()).map_err(|e| {
        DecodeError::new(
            sequence_number_of(raw.get()).as_deref(),
            format!("not a DynamoDB stream record: {e}"),
        )
    })?;
    let data = record
        .dynamodb
        .ok_or_else(|| DecodeError::new(None, "the `dynamodb` member is missing"))?;
    let seq = data
        .sequence_number
        .ok_or_else(|| DecodeError::new(None, "SequenceNumber is missing"))?;
    let change = change(record.event_name.as_deref(), data.new_image.as_ref(), &seq)?;
    Ok(StreamRecord {
        sequence_number: seq.into_owned(),
        change,
    })
}

/// Best effort: the sequence number of a record that failed to parse, so it
/// can still be reported or dead-lettered by position.
fn sequence_number_of(json: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v.get("dynamodb")?
        .get("SequenceNumber")?
        .as_str()
        .map(str::to_owned)
}

// ---- The Streams API shape ----------------------------------------------------

/// Decodes one record returned by the Streams API's `GetRecords`.
pub fn decode_streams_record(
    record: &aws_sdk_dynamodbstreams::types::Record,
) -> Result<StreamRecord, DecodeError> {
    let data = record
        .dynamodb()
        .ok_or_else(|| DecodeError::new(None, "the `dynamodb` member is missing"))?;
    let seq = data
        .sequence_number()
        .ok_or_else(|| DecodeError::new(None, "SequenceNumber is missing"))?;
    let kind = record.event_name().map(|k| k.as_str());
    let image: Option<&HashMap<String, aws_sdk_dynamodbstreams::types::AttributeValue>> =
        data.new_image.as_ref();
    let change = change(kind, image, seq)?;
    Ok(StreamRecord {
        sequence_number: seq.to_owned(),
        change,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use outbox_core::Event;

    fn lambda_record(name: &str, seq: &str, image: serde_json::Value) -> Box<RawValue> {
        let v = serde_json::json!({
            "eventID": "1", "eventName": name, "eventVersion": "1.1",
            "eventSource": "aws:dynamodb", "awsRegion": "us-east-1",
            "dynamodb": {
                "ApproximateCreationDateTime": 1_700_000_000.0,
                "Keys": {"pk": {"S": "Order#o-1"}},
                "NewImage": image, "SequenceNumber": seq, "SizeBytes": 10,
                "StreamViewType": "NEW_IMAGE"
            },
            "eventSourceARN": "arn:aws:dynamodb:us-east-1:000000000000:table/Outbox/stream/x"
        });
        RawValue::from_string(v.to_string()).unwrap()
    }

    fn image(events: &[Event]) -> serde_json::Value {
        let list: Vec<_> = events
            .iter()
            .map(|e| serde_json::json!({"S": serde_json::to_string(e).unwrap()}))
            .collect();
        let last = events.last().unwrap();
        serde_json::json!({
            "pk": {"S": "Order#o-1"}, "aggregate_type": {"S": "Order"},
            "aggregate_id": {"S": last.aggregate_id}, "version": {"N": last.aggregate_version.to_string()},
            "events": {"L": list}, "committed_at": {"N": "1"}, "extra": {"M": {"a": {"BOOL": true}}}
        })
    }

    #[test]
    fn lambda_records_decode() {
        let e = Event::builder("Order", "o-1", 1, "OrderCreated")
            .build()
            .unwrap();
        let r = decode_lambda_record(&lambda_record(
            "INSERT",
            "100",
            image(std::slice::from_ref(&e)),
        ))
        .unwrap();
        assert_eq!(r.sequence_number, "100");
        assert!(matches!(r.change, Change::Events(ref item) if item.events == vec![e.clone()]));
        let r =
            decode_lambda_record(&lambda_record("REMOVE", "101", serde_json::json!(null))).unwrap();
        assert!(matches!(r.change, Change::Ignored { .. }));
    }

    #[test]
    fn malformed_lambda_records_are_errors() {
        let bad_version = serde_json::json!({"aggregate_type": {"S": "Order"}, "aggregate_id": {"S": "o-1"},
            "version": {"S": "1"}, "events": {"L": []}});
        let err = decode_lambda_record(&lambda_record("MODIFY", "7", bad_version)).unwrap_err();
        assert_eq!(err.sequence_number.as_deref(), Some("7"));
        let err = decode_lambda_record(&lambda_record(
            "INSERT",
            "8",
            serde_json::json!({"events": 3}),
        ))
        .unwrap_err();
        assert_eq!(err.sequence_number.as_deref(), Some("8"));
        let err = decode_lambda_record(&RawValue::from_string("{}".into()).unwrap()).unwrap_err();
        assert!(err.reason.contains("dynamodb"));
        assert!(LambdaStreamEvent::from_json("[1]").is_err());
    }
}
