//! The event envelope: what a service records beside its business change.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::InvalidEvent;

/// The identity of an event, a UUIDv7 fixed when the event is created.
///
/// Publishers hand it to the broker's own de-duplication (`Nats-Msg-Id`,
/// `MessageDeduplicationId`, AMQP `message_id`) and consumers key their inbox on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventId(uuid::Uuid);

impl EventId {
    /// A new time-ordered id (UUIDv7).
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7())
    }

    pub fn from_uuid(uuid: uuid::Uuid) -> Self {
        Self(uuid)
    }

    pub fn as_uuid(&self) -> &uuid::Uuid {
        &self.0
    }
}

impl Default for EventId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl FromStr for EventId {
    type Err = InvalidEvent;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s)
            .map(Self)
            .map_err(|e| InvalidEvent::new("id", format!("`{s}` is not a UUID: {e}")))
    }
}

/// A JSON document kept as the text it was written as.
///
/// Relays never need to look inside a payload, so it is stored, read and
/// embedded into the wire format without being parsed again.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Payload(Box<RawValue>);

impl Payload {
    /// Serializes any value into a payload.
    pub fn from_value<T: Serialize + ?Sized>(value: &T) -> Result<Self, InvalidEvent> {
        serde_json::value::to_raw_value(value)
            .map(Self)
            .map_err(|e| InvalidEvent::new("payload", e.to_string()))
    }

    /// Checks that `json` is one JSON document and keeps it as written.
    pub fn from_json(json: impl Into<String>) -> Result<Self, InvalidEvent> {
        RawValue::from_string(json.into())
            .map(Self)
            .map_err(|e| InvalidEvent::new("payload", format!("not valid JSON: {e}")))
    }

    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    pub fn as_raw(&self) -> &RawValue {
        &self.0
    }

    /// Decodes the payload into a typed value.
    pub fn to_value<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.as_str())
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Payload {}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Tracing and causality data carried along with an event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// W3C trace context of the operation that produced the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Id shared by every message of one business conversation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// Id of the message (command or event) that caused this event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
}

/// A domain event, as recorded in the outbox and published to a broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub id: EventId,
    /// The kind of entity the event belongs to, such as `Order`.
    pub aggregate_type: String,
    /// Which entity: events of one aggregate are published in version order.
    pub aggregate_id: String,
    /// Position of the event in its aggregate's history, starting at 1.
    pub aggregate_version: u64,
    /// Such as `OrderCreated`.
    pub event_type: String,
    pub payload: Payload,
    pub occurred_at: DateTime<Utc>,
    #[serde(default)]
    pub metadata: Metadata,
}

impl Event {
    /// Starts an event with a fresh id and the current time.
    ///
    /// ```
    /// use outbox_core::Event;
    /// let event = Event::builder("Order", "order-42", 1, "OrderCreated")
    ///     .payload(&serde_json::json!({ "total": 99 }))
    ///     .correlation_id("req-7")
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(event.aggregate_version, 1);
    /// ```
    pub fn builder(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        aggregate_version: u64,
        event_type: impl Into<String>,
    ) -> EventBuilder {
        EventBuilder {
            event: Event {
                id: EventId::new(),
                aggregate_type: aggregate_type.into(),
                aggregate_id: aggregate_id.into(),
                aggregate_version,
                event_type: event_type.into(),
                payload: Payload(
                    RawValue::from_string("{}".to_owned()).expect("`{}` is valid JSON"),
                ),
                // Microseconds: what every store keeps, so an event reads back equal.
                occurred_at: Utc::now().trunc_subsecs(6),
                metadata: Metadata::default(),
            },
            error: None,
        }
    }

    /// Checks the fields every store and publisher relies on.
    pub fn validate(&self) -> Result<(), InvalidEvent> {
        fn name(field: &'static str, value: &str) -> Result<(), InvalidEvent> {
            if value.trim().is_empty() {
                return Err(InvalidEvent::new(field, "must not be empty"));
            }
            if value.len() > MAX_NAME_BYTES {
                return Err(InvalidEvent::new(
                    field,
                    format!("is {} bytes, at most {MAX_NAME_BYTES} allowed", value.len()),
                ));
            }
            if value.chars().any(char::is_control) {
                return Err(InvalidEvent::new(
                    field,
                    "must not contain control characters",
                ));
            }
            Ok(())
        }
        name("aggregate_type", &self.aggregate_type)?;
        name("aggregate_id", &self.aggregate_id)?;
        name("event_type", &self.event_type)?;
        if self.aggregate_version == 0 || self.aggregate_version > i64::MAX as u64 {
            return Err(InvalidEvent::new(
                "aggregate_version",
                format!("must be between 1 and {}", i64::MAX),
            ));
        }
        Ok(())
    }

    /// The key that orders events: one queue per aggregate.
    pub fn aggregate_key(&self) -> (&str, &str) {
        (&self.aggregate_type, &self.aggregate_id)
    }
}

/// Longest aggregate type, aggregate id or event type accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 512;

/// Builds an [`Event`]; errors are reported by [`EventBuilder::build`].
#[derive(Debug)]
#[must_use]
pub struct EventBuilder {
    event: Event,
    error: Option<InvalidEvent>,
}

impl EventBuilder {
    /// Serializes `payload` as the event's data.
    pub fn payload<T: Serialize + ?Sized>(mut self, payload: &T) -> Self {
        match Payload::from_value(payload) {
            Ok(p) => self.event.payload = p,
            Err(e) => self.error = Some(e),
        }
        self
    }

    /// Uses an already serialized JSON payload.
    pub fn payload_json(mut self, payload: Payload) -> Self {
        self.event.payload = payload;
        self
    }

    pub fn id(mut self, id: EventId) -> Self {
        self.event.id = id;
        self
    }

    pub fn occurred_at(mut self, at: DateTime<Utc>) -> Self {
        self.event.occurred_at = at.trunc_subsecs(6);
        self
    }

    pub fn traceparent(mut self, value: impl Into<String>) -> Self {
        self.event.metadata.traceparent = Some(value.into());
        self
    }

    pub fn correlation_id(mut self, value: impl Into<String>) -> Self {
        self.event.metadata.correlation_id = Some(value.into());
        self
    }

    pub fn causation_id(mut self, value: impl Into<String>) -> Self {
        self.event.metadata.causation_id = Some(value.into());
        self
    }

    pub fn metadata(mut self, metadata: Metadata) -> Self {
        self.event.metadata = metadata;
        self
    }

    pub fn build(self) -> Result<Event, InvalidEvent> {
        if let Some(e) = self.error {
            return Err(e);
        }
        self.event.validate()?;
        Ok(self.event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_v7_and_sort_by_creation() {
        let a = EventId::new();
        let b = EventId::new();
        assert_eq!(a.as_uuid().get_version_num(), 7);
        assert!(a < b);
        assert_eq!(a.to_string().parse::<EventId>().unwrap(), a);
        assert!("nope".parse::<EventId>().is_err());
    }

    #[test]
    fn builder_refuses_bad_fields() {
        let err = Event::builder("Order", "", 1, "OrderCreated")
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "aggregate_id");
        let err = Event::builder("Order", "o-1", 0, "OrderCreated")
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "aggregate_version");
        let err = Event::builder("Order", "o-1", 1, "Order\nCreated")
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "event_type");
        assert!(Payload::from_json("{not json").is_err());
    }

    #[test]
    fn payload_is_kept_as_written() {
        let p = Payload::from_json(r#"{"b":1,  "a":[1,2]}"#).unwrap();
        assert_eq!(p.as_str(), r#"{"b":1,  "a":[1,2]}"#);
        let e = Event::builder("Order", "o-1", 1, "OrderCreated")
            .payload_json(p.clone())
            .build()
            .unwrap();
        let back: Event = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back, e);
    }
}
