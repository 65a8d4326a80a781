//! The stream-shape outbox item: one item per aggregate, rewritten by every
//! transaction that records events of that aggregate.
//!
//! ```text
//! pk              S   "<aggregate type>#<aggregate id>"   (table key)
//! aggregate_type  S
//! aggregate_id    S
//! version         N   the aggregate's version after this transaction (its last event's)
//! events          L   of S: this transaction's events, in version order, each the
//!                     envelope as JSON (payload kept as written)
//! committed_at    N   milliseconds since the epoch, when the writer built the transaction
//! ```
//!
//! DynamoDB Streams orders records per item, so one item per aggregate makes
//! an aggregate's transactions reach the relay in commit order.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use outbox_core::{Event, InvalidEvent};

pub const PK: &str = "pk";
pub const AGGREGATE_TYPE: &str = "aggregate_type";
pub const AGGREGATE_ID: &str = "aggregate_id";
pub const VERSION: &str = "version";
pub const EVENTS: &str = "events";
pub const COMMITTED_AT: &str = "committed_at";

/// The separator between aggregate type and id in `pk`; refused in types so a
/// key reads back as one pair only.
pub const KEY_SEPARATOR: char = '#';

/// The table key of an aggregate's outbox item.
pub fn aggregate_key(aggregate_type: &str, aggregate_id: &str) -> Result<String, InvalidEvent> {
    if aggregate_type.contains(KEY_SEPARATOR) {
        return Err(InvalidEvent::new(
            "aggregate_type",
            format!("must not contain `{KEY_SEPARATOR}` on DynamoDB (it separates type and id in the key)"),
        ));
    }
    Ok(format!("{aggregate_type}{KEY_SEPARATOR}{aggregate_id}"))
}

/// One event as stored in the `events` list.
pub fn encode_event(event: &Event) -> Result<String, InvalidEvent> {
    serde_json::to_string(event).map_err(|e| InvalidEvent::new("payload", e.to_string()))
}

/// Reads one entry of the `events` list back.
pub fn decode_event(json: &str) -> Result<Event, InvalidEvent> {
    let event: Event = serde_json::from_str(json)
        .map_err(|e| InvalidEvent::new("events", format!("entry is not an outbox event: {e}")))?;
    event.validate()?;
    Ok(event)
}

/// The attributes a transaction sets on its aggregate's item (all but `pk`).
pub fn item_values(
    events: &[Event],
    committed_at_ms: i64,
) -> Result<HashMap<String, AttributeValue>, InvalidEvent> {
    let Some(last) = events.last() else {
        return Err(InvalidEvent::new(
            "events",
            "an outbox item needs at least one event",
        ));
    };
    let encoded = events
        .iter()
        .map(|e| encode_event(e).map(AttributeValue::S))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(HashMap::from([
        (
            AGGREGATE_TYPE.to_owned(),
            AttributeValue::S(last.aggregate_type.clone()),
        ),
        (
            AGGREGATE_ID.to_owned(),
            AttributeValue::S(last.aggregate_id.clone()),
        ),
        (
            VERSION.to_owned(),
            AttributeValue::N(last.aggregate_version.to_string()),
        ),
        (EVENTS.to_owned(), AttributeValue::L(encoded)),
        (
            COMMITTED_AT.to_owned(),
            AttributeValue::N(committed_at_ms.to_string()),
        ),
    ]))
}

/// The events an outbox item carries, read from any attribute representation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxItem {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub version: u64,
    pub events: Vec<Event>,
}

/// Read access to an item image, whatever SDK or JSON shape it came in.
pub trait Image {
    fn string(&self, name: &str) -> Result<Option<&str>, String>;
    fn number(&self, name: &str) -> Result<Option<&str>, String>;
    /// The `S` entries of an `L` attribute.
    fn string_list(&self, name: &str) -> Result<Option<Vec<&str>>, String>;
}

impl OutboxItem {
    /// Decodes an image; every event must belong to the item's aggregate, in
    /// increasing versions ending at `version`.
    pub fn decode(image: &impl Image) -> Result<Self, InvalidEvent> {
        let bad = |field: &'static str, reason: String| InvalidEvent::new(field, reason);
        let required = |field: &'static str, v: Result<Option<&str>, String>| {
            v.map_err(|r| bad(field, r))?
                .ok_or_else(|| bad(field, "is missing".to_owned()))
                .map(str::to_owned)
        };
        let aggregate_type = required("aggregate_type", image.string(AGGREGATE_TYPE))?;
        let aggregate_id = required("aggregate_id", image.string(AGGREGATE_ID))?;
        let version: u64 = required("version", image.number(VERSION))?
            .parse()
            .map_err(|e| bad("version", format!("is not a version number: {e}")))?;
        let entries = image
            .string_list(EVENTS)
            .map_err(|r| bad("events", r))?
            .ok_or_else(|| bad("events", "is missing".to_owned()))?;
        let mut events = Vec::with_capacity(entries.len());
        for entry in entries {
            let event = decode_event(entry)?;
            if event.aggregate_type != aggregate_type || event.aggregate_id != aggregate_id {
                return Err(bad(
                    "events",
                    format!(
                        "event {} belongs to {}/{}, not to the item's {aggregate_type}/{aggregate_id}",
                        event.id, event.aggregate_type, event.aggregate_id
                    ),
                ));
            }
            if let Some(prev) = events.last().map(|e: &Event| e.aggregate_version) {
                if event.aggregate_version <= prev {
                    return Err(bad(
                        "events",
                        format!("version {} follows {prev}", event.aggregate_version),
                    ));
                }
            }
            events.push(event);
        }
        match events.last() {
            None => return Err(bad("events", "is empty".to_owned())),
            Some(last) if last.aggregate_version != version => {
                return Err(bad(
                    "version",
                    format!(
                        "is {version} but the last event is version {}",
                        last.aggregate_version
                    ),
                ))
            }
            Some(_) => {}
        }
        Ok(Self {
            aggregate_type,
            aggregate_id,
            version,
            events,
        })
    }
}

macro_rules! sdk_image {
    ($($attr:ident)::+) => {
        impl Image for HashMap<String, $($attr)::+> {
            // The two SDKs generate the same enum in two crates.
            fn string(&self, name: &str) -> Result<Option<&str>, String> {
                match self.get(name) {
                    None => Ok(None),
                    Some($($attr)::+::S(s)) => Ok(Some(s)),
                    Some(_) => Err("is not a string (S)".to_owned()),
                }
            }

            fn number(&self, name: &str) -> Result<Option<&str>, String> {
                match self.get(name) {
                    None => Ok(None),
                    Some($($attr)::+::N(n)) => Ok(Some(n)),
                    Some(_) => Err("is not a number (N)".to_owned()),
                }
            }

            fn string_list(&self, name: &str) -> Result<Option<Vec<&str>>, String> {
                match self.get(name) {
                    None => Ok(None),
                    Some($($attr)::+::L(list)) => list
                        .iter()
                        .map(|v| match v {
                            $($attr)::+::S(s) => Ok(s.as_str()),
                            _ => Err("has an entry that is not a string (S)".to_owned()),
                        })
                        .collect::<Result<Vec<_>, _>>()
                        .map(Some),
                    Some(_) => Err("is not a list (L)".to_owned()),
                }
            }
        }
    };
}

sdk_image!(aws_sdk_dynamodb::types::AttributeValue);
sdk_image!(aws_sdk_dynamodbstreams::types::AttributeValue);

#[cfg(test)]
mod tests {
    use super::*;

    fn events(agg: &str, versions: std::ops::RangeInclusive<u64>) -> Vec<Event> {
        versions
            .map(|v| {
                Event::builder("Order", agg, v, "OrderUpdated")
                    .payload(&serde_json::json!({"v": v}))
                    .build()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn item_round_trips() {
        let evs = events("o-1", 3..=5);
        let image = item_values(&evs, 1_700_000_000_000).unwrap();
        let item = OutboxItem::decode(&image).unwrap();
        assert_eq!(item.version, 5);
        assert_eq!(item.events, evs);
        assert_eq!(aggregate_key("Order", "o-1").unwrap(), "Order#o-1");
        assert!(aggregate_key("Or#der", "o-1").is_err());
    }

    #[test]
    fn refuses_inconsistent_items() {
        let mut image = item_values(&events("o-1", 1..=2), 0).unwrap();
        image.insert(VERSION.into(), AttributeValue::N("7".into()));
        assert_eq!(OutboxItem::decode(&image).unwrap_err().field(), "version");
        image.insert(VERSION.into(), AttributeValue::S("2".into()));
        assert_eq!(OutboxItem::decode(&image).unwrap_err().field(), "version");
        let mut image = item_values(&events("o-1", 1..=2), 0).unwrap();
        image.insert(
            EVENTS.into(),
            AttributeValue::L(vec![AttributeValue::S("{".into())]),
        );
        assert_eq!(OutboxItem::decode(&image).unwrap_err().field(), "events");
        image.remove(EVENTS);
        assert_eq!(OutboxItem::decode(&image).unwrap_err().field(), "events");
    }
}
