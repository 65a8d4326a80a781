//! Stream records: the Lambda DynamoDB stream event as the `PublishEvents`
//! function receives it, and the Streams API's `GetRecords` records.

use aws_sdk_dynamodbstreams::types::{OperationType, Record, StreamRecord as SdkStreamRecord};
use fastrand::Rng;
use outbox_core::publishers::NullPublisher;
use outbox_dynamodb::{
    decode_lambda_record, decode_streams_record, item, Change, LambdaStreamEvent, OutboxItem,
};
use outbox_lambda::{MemoryDeadLetters, StreamRelayHandler};
use serde_json::Value;

use crate::attrs::stream_image;
use crate::corpus::{self, Seeds};
use crate::mutate::{json_input, mutate_json};
use crate::runner::{refusal, Target, Verdict};
use crate::targets::lossy;

/// What a stream-record refusal may name.
pub const RECORD_NAMES: &[&str] = &[
    "Records",
    "dynamodb",
    "SequenceNumber",
    "eventName",
    "NewImage",
    "aggregate_type",
    "aggregate_id",
    "aggregate_version",
    "`version`",
    "`events`",
    "`payload`",
    "`id`",
    "event_type",
    "occurred_at",
    "metadata",
];

/// `{"Records": [...]}` bytes, as Lambda hands them to the function: the
/// runtime's JSON decoding, each record's decoding, then the whole handler
/// (with a publisher that takes everything) and its books.
#[derive(Debug)]
pub struct LambdaStream {
    seeds: Seeds,
    runtime: tokio::runtime::Runtime,
}

impl LambdaStream {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            seeds: Seeds::from_texts(corpus::LAMBDA_EVENTS),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()?,
        })
    }
}

impl Target for LambdaStream {
    type Input = Vec<u8>;

    fn name(&self) -> &'static str {
        "lambda-stream"
    }

    fn generate(&self, rng: &mut Rng) -> Vec<u8> {
        json_input(
            rng,
            &self.seeds.docs,
            &self.seeds.text_slices(),
            &self.seeds.known,
        )
    }

    fn dump(&self, input: &Vec<u8>) -> Vec<u8> {
        input.clone()
    }

    fn check(&self, input: &Vec<u8>) -> Verdict {
        // What the Lambda runtime does with the invocation's bytes.
        let event: LambdaStreamEvent = match serde_json::from_slice(input) {
            Ok(event) => event,
            Err(e) => {
                // The same text through the crate's own entry point.
                return match LambdaStreamEvent::from_json(&lossy(input)) {
                    Ok(_) if std::str::from_utf8(input).is_ok() => Verdict::Broken(format!(
                        "the runtime's decoding refused it ({e}) but from_json took it"
                    )),
                    Ok(_) => Verdict::Refused,
                    Err(e) => refusal(&e.to_string(), RECORD_NAMES),
                };
            }
        };
        let mut expected_events = 0;
        let mut malformed = 0;
        let mut verdict = Verdict::Accepted;
        for raw in &event.records {
            match decode_lambda_record(raw) {
                Ok(record) => {
                    if let Change::Events(item) = &record.change {
                        expected_events += item.events.len();
                        if let Some(broken) = item_invariants(item) {
                            return broken;
                        }
                        if let Some(broken) = lambda_round_trip(&record.sequence_number, item) {
                            return broken;
                        }
                    }
                }
                Err(e) => {
                    malformed += 1;
                    if let Verdict::Broken(why) = refusal(&e.reason, RECORD_NAMES) {
                        return Verdict::Broken(why);
                    }
                    // A record that names its position must get it back.
                    let seq = serde_json::from_str::<Value>(raw.get()).ok().and_then(|v| {
                        v.pointer("/dynamodb/SequenceNumber")
                            .and_then(Value::as_str)
                            .map(str::to_owned)
                    });
                    if seq.is_some() && e.sequence_number != seq {
                        return Verdict::Broken(format!(
                            "the record has SequenceNumber {seq:?} but the error carries {:?}",
                            e.sequence_number
                        ));
                    }
                    verdict = Verdict::Refused;
                }
            }
        }
        // The handler over the same event: every record accounted for.
        let handler = StreamRelayHandler::new(NullPublisher, MemoryDeadLetters::new());
        let report = self.runtime.block_on(handler.process(&event));
        let kept = handler.dead_letters().records().len();
        if report.records != event.records.len()
            || report.malformed != malformed
            || report.published != expected_events
            || report.dead_lettered != 0
            || report.unfinished != 0
            || !report.response.is_success()
            || kept != malformed
        {
            return Verdict::Broken(format!(
                "the handler's books disagree: {} records, {malformed} malformed, \
                 {expected_events} events, {kept} dead records kept; report {report:?}",
                event.records.len()
            ));
        }
        verdict
    }
}

/// The rules a decoded item keeps: events of its aggregate, increasing
/// versions ending at the item's.
pub fn item_invariants(item: &OutboxItem) -> Option<Verdict> {
    let belongs = item
        .events
        .iter()
        .all(|e| e.aggregate_type == item.aggregate_type && e.aggregate_id == item.aggregate_id);
    let increasing = item
        .events
        .windows(2)
        .all(|w| w[0].aggregate_version < w[1].aggregate_version);
    let ends_at_version = item
        .events
        .last()
        .is_some_and(|e| e.aggregate_version == item.version);
    let valid = item.events.iter().all(|e| e.validate().is_ok());
    if belongs && increasing && ends_at_version && valid {
        None
    } else {
        Some(Verdict::Broken(format!(
            "an accepted item breaks the item rules (belongs {belongs}, increasing {increasing}, \
             ends at version {ends_at_version}, valid {valid}): {item:?}"
        )))
    }
}

/// An accepted item written again as a record decodes to the same.
fn lambda_round_trip(sequence_number: &str, item: &OutboxItem) -> Option<Verdict> {
    let Some(json) = outbox_lambda::testing::stream_record("INSERT", sequence_number, &item.events)
    else {
        // `#` in the aggregate type cannot be written as a key; the
        // decoder does not read the key, so it may still accept it.
        return None;
    };
    let raw = match serde_json::value::to_raw_value(&json) {
        Ok(raw) => raw,
        Err(e) => return Some(Verdict::Broken(format!("re-encoding failed: {e}"))),
    };
    match decode_lambda_record(&raw) {
        Ok(again) if again.sequence_number == sequence_number => match again.change {
            Change::Events(back) if &back == item => None,
            other => Some(Verdict::Broken(format!(
                "round trip changed the item: {item:?} became {other:?}"
            ))),
        },
        other => Some(Verdict::Broken(format!(
            "round trip failed: {other:?} for {item:?}"
        ))),
    }
}

/// A Streams API record, built from a mutated fixture record: the SDK's
/// types as `GetRecords` fills them.
#[derive(Debug)]
pub struct StreamsApi {
    seeds: Seeds,
}

impl StreamsApi {
    pub fn new() -> Self {
        Self {
            seeds: Seeds::new(corpus::lambda_records()),
        }
    }
}

impl Default for StreamsApi {
    fn default() -> Self {
        Self::new()
    }
}

/// A record of the SDK from its JSON (as a Lambda event spells it).
pub fn sdk_record(v: &Value) -> Record {
    let text = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    };
    let data = v.get("dynamodb").map(|d| {
        SdkStreamRecord::builder()
            .set_sequence_number(d.get("SequenceNumber").and_then(text))
            .set_new_image(d.get("NewImage").filter(|i| !i.is_null()).map(stream_image))
            .set_keys(d.get("Keys").filter(|k| !k.is_null()).map(stream_image))
            .build()
    });
    Record::builder()
        .set_event_id(v.get("eventID").and_then(text))
        .set_event_name(
            v.get("eventName")
                .and_then(text)
                .map(|n| OperationType::from(n.as_str())),
        )
        .set_event_source(v.get("eventSource").and_then(text))
        .set_dynamodb(data)
        .build()
}

impl Target for StreamsApi {
    type Input = Record;

    fn name(&self) -> &'static str {
        "streams-api"
    }

    fn generate(&self, rng: &mut Rng) -> Record {
        let pick = rng.usize(..self.seeds.docs.len().max(1));
        let mut doc = self.seeds.docs.get(pick).cloned().unwrap_or(Value::Null);
        if rng.usize(..10) != 0 {
            mutate_json(rng, &mut doc, &self.seeds.known, 4);
        }
        sdk_record(&doc)
    }

    fn dump(&self, input: &Record) -> Vec<u8> {
        format!("{input:#?}\n").into_bytes()
    }

    fn check(&self, record: &Record) -> Verdict {
        match decode_streams_record(record) {
            Ok(decoded) => {
                let Change::Events(item) = &decoded.change else {
                    return Verdict::Accepted;
                };
                if let Some(broken) = item_invariants(item) {
                    return broken;
                }
                // Written again as a Streams image, read back the same.
                let image = match item::item_values(&item.events, 0) {
                    Ok(values) => values
                        .iter()
                        .map(|(k, v)| (k.clone(), to_stream_value(v)))
                        .collect(),
                    Err(e) => return Verdict::Broken(format!("re-encoding failed: {e}")),
                };
                let again = Record::builder()
                    .event_name(OperationType::Insert)
                    .dynamodb(
                        SdkStreamRecord::builder()
                            .sequence_number(decoded.sequence_number.clone())
                            .set_new_image(Some(image))
                            .build(),
                    )
                    .build();
                match decode_streams_record(&again) {
                    Ok(back) if back == decoded => Verdict::Accepted,
                    other => Verdict::Broken(format!(
                        "round trip changed the record: {decoded:?} became {other:?}"
                    )),
                }
            }
            Err(e) => {
                if let Verdict::Broken(why) = refusal(&e.reason, RECORD_NAMES) {
                    return Verdict::Broken(why);
                }
                let seq = record.dynamodb().and_then(|d| d.sequence_number());
                if seq.is_some() && e.sequence_number.as_deref() != seq {
                    return Verdict::Broken(format!(
                        "the record has SequenceNumber {seq:?} but the error carries {:?}",
                        e.sequence_number
                    ));
                }
                Verdict::Refused
            }
        }
    }
}

/// The item values the writer builds (table SDK) as the Streams SDK's.
fn to_stream_value(
    v: &aws_sdk_dynamodb::types::AttributeValue,
) -> aws_sdk_dynamodbstreams::types::AttributeValue {
    use aws_sdk_dynamodb::types::AttributeValue as T;
    use aws_sdk_dynamodbstreams::types::AttributeValue as S;
    match v {
        T::S(s) => S::S(s.clone()),
        T::N(n) => S::N(n.clone()),
        T::L(l) => S::L(l.iter().map(to_stream_value).collect()),
        // The writer uses no other type for these attributes.
        other => S::S(format!("{other:?}")),
    }
}
