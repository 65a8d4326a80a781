//! Outbox items of both DynamoDB shapes, as the table SDK reads them:
//! the stream shape (one item per aggregate, its transaction's events in a
//! list) and the polling shape (one item per event).

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use fastrand::Rng;
use outbox_dynamodb::polling::read_event;
use outbox_dynamodb::{item, OutboxItem};
use serde_json::Value;

use crate::attrs::table_item;
use crate::corpus::{self, Seeds};
use crate::mutate::mutate_json;
use crate::runner::{refusal, Target, Verdict};
use crate::targets::stream::item_invariants;

/// What an item refusal may name: the envelope's fields and the item's
/// attributes.
const ITEM_NAMES: &[&str] = &[
    "`aggregate_type`",
    "`aggregate_id`",
    "`aggregate_version`",
    "`version`",
    "`events`",
    "`event_type`",
    "`payload`",
    "`id`",
    "`occurred_at`",
    "`metadata`",
    "`event`",
    "pk",
    "sk",
    // The key check prints both keys: the event's and the item's.
    "but the item is",
];

type Item = HashMap<String, AttributeValue>;

fn mutated_item(rng: &mut Rng, seeds: &Seeds) -> Item {
    let pick = rng.usize(..seeds.docs.len().max(1));
    let mut doc = seeds.docs.get(pick).cloned().unwrap_or(Value::Null);
    if rng.usize(..10) != 0 {
        mutate_json(rng, &mut doc, &seeds.known, 4);
    }
    table_item(&doc)
}

/// Sorted, so a failure file reads the same every time.
fn dump_item(item: &Item) -> Vec<u8> {
    let sorted: std::collections::BTreeMap<_, _> = item.iter().collect();
    format!("{sorted:#?}\n").into_bytes()
}

/// The stream shape: `OutboxItem::decode` over the table SDK's attributes.
#[derive(Debug)]
pub struct StreamItem {
    seeds: Seeds,
}

impl StreamItem {
    pub fn new() -> Self {
        Self {
            seeds: Seeds::new(corpus::stream_items()),
        }
    }
}

impl Default for StreamItem {
    fn default() -> Self {
        Self::new()
    }
}

impl Target for StreamItem {
    type Input = Item;

    fn name(&self) -> &'static str {
        "item-stream-shape"
    }

    fn generate(&self, rng: &mut Rng) -> Item {
        mutated_item(rng, &self.seeds)
    }

    fn dump(&self, input: &Item) -> Vec<u8> {
        dump_item(input)
    }

    fn check(&self, image: &Item) -> Verdict {
        match OutboxItem::decode(image) {
            Ok(decoded) => {
                if let Some(broken) = item_invariants(&decoded) {
                    return broken;
                }
                // What a writer stores for these events reads back the same.
                let again = match item::item_values(&decoded.events, 0) {
                    Ok(values) => values,
                    Err(e) => return Verdict::Broken(format!("re-encoding failed: {e}")),
                };
                match OutboxItem::decode(&again) {
                    Ok(back) if back == decoded => Verdict::Accepted,
                    other => Verdict::Broken(format!(
                        "round trip changed the item: {decoded:?} became {other:?}"
                    )),
                }
            }
            Err(e) => {
                if e.field().is_empty() {
                    return Verdict::Broken(format!("a refusal without a field: {e}"));
                }
                refusal(&e.to_string(), ITEM_NAMES)
            }
        }
    }
}

/// The polling shape: an event item's `event` attribute read back and
/// checked against the item's key by the polling source's own `read_event`.
#[derive(Debug)]
pub struct PollingItem {
    seeds: Seeds,
}

impl PollingItem {
    pub fn new() -> Self {
        Self {
            seeds: Seeds::new(corpus::polling_items()),
        }
    }
}

impl Default for PollingItem {
    fn default() -> Self {
        Self::new()
    }
}

/// The polling source's key of an item: `pk` (S) and `sk` (N, u64).
fn item_key(item: &Item) -> Option<(&str, u64)> {
    let pk = match item.get(item::PK) {
        Some(AttributeValue::S(pk)) => pk.as_str(),
        _ => return None,
    };
    let sk = match item.get("sk") {
        Some(AttributeValue::N(sk)) => sk.parse::<i64>().ok()?,
        _ => return None,
    };
    Some((pk, u64::try_from(sk).ok()?))
}

impl Target for PollingItem {
    type Input = Item;

    fn name(&self) -> &'static str {
        "item-polling-shape"
    }

    fn generate(&self, rng: &mut Rng) -> Item {
        mutated_item(rng, &self.seeds)
    }

    fn dump(&self, input: &Item) -> Vec<u8> {
        dump_item(input)
    }

    fn check(&self, image: &Item) -> Verdict {
        let Some((pk, version)) = item_key(image) else {
            // The source skips (claim) or lists as unreadable (dead letters)
            // an item without a readable key; nothing to decode.
            return Verdict::Refused;
        };
        match read_event(image, pk, version) {
            Ok(event) => {
                if let Err(e) = event.validate() {
                    return Verdict::Broken(format!("accepted an invalid event: {e}"));
                }
                let again = item::encode_event(&event).and_then(|json| item::decode_event(&json));
                match again {
                    Ok(back) if back == event => Verdict::Accepted,
                    other => Verdict::Broken(format!(
                        "round trip changed the event: {event:?} became {other:?}"
                    )),
                }
            }
            Err(reason) => refusal(&reason, ITEM_NAMES),
        }
    }
}
