//! The wire format: CloudEvents 1.0, JSON structured mode.
//!
//! The aggregate and tracing fields travel as extension attributes
//! (`aggregatetype`, `aggregateversion`, `traceparent`, `correlationid`,
//! `causationid`); the aggregate id is the `subject`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::InvalidEvent;
use crate::event::{Event, EventId, Metadata, Payload};

pub const SPEC_VERSION: &str = "1.0";
pub const CONTENT_TYPE: &str = "application/json";
/// MIME type of a whole structured-mode message.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

#[derive(Serialize)]
struct Outgoing<'a> {
    specversion: &'static str,
    id: EventId,
    source: &'a str,
    #[serde(rename = "type")]
    ty: &'a str,
    subject: &'a str,
    time: String,
    datacontenttype: &'static str,
    data: &'a RawValue,
    aggregatetype: &'a str,
    aggregateversion: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlationid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    causationid: Option<&'a str>,
}

/// Renders `event` as a structured-mode CloudEvent, `source` naming the producer.
pub fn to_json(event: &Event, source: &str) -> String {
    let out = Outgoing {
        specversion: SPEC_VERSION,
        id: event.id,
        source,
        ty: &event.event_type,
        subject: &event.aggregate_id,
        time: event
            .occurred_at
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        datacontenttype: CONTENT_TYPE,
        data: event.payload.as_raw(),
        aggregatetype: &event.aggregate_type,
        aggregateversion: event.aggregate_version,
        traceparent: event.metadata.traceparent.as_deref(),
        correlationid: event.metadata.correlation_id.as_deref(),
        causationid: event.metadata.causation_id.as_deref(),
    };
    // Serializing plain strings, numbers and already-valid raw JSON cannot fail.
    serde_json::to_string(&out).unwrap_or_default()
}

#[derive(Deserialize)]
struct Incoming {
    specversion: String,
    id: EventId,
    source: String,
    #[serde(rename = "type")]
    ty: String,
    subject: Option<String>,
    time: Option<DateTime<Utc>>,
    data: Option<Box<RawValue>>,
    aggregatetype: Option<String>,
    #[serde(default, deserialize_with = "version")]
    aggregateversion: Option<u64>,
    traceparent: Option<String>,
    correlationid: Option<String>,
    causationid: Option<String>,
}

/// CloudEvents extension values may arrive as strings ("7") or numbers (7).
fn version<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum V {
        N(u64),
        S(String),
    }
    match Option::<V>::deserialize(d)? {
        None => Ok(None),
        Some(V::N(n)) => Ok(Some(n)),
        Some(V::S(s)) => s.parse().map(Some).map_err(serde::de::Error::custom),
    }
}

/// A CloudEvent read back into the envelope, with the producer's `source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub event: Event,
    pub source: String,
}

/// Parses a structured-mode CloudEvent produced by [`to_json`].
pub fn from_json(body: &str) -> Result<Received, InvalidEvent> {
    let ce: Incoming = serde_json::from_str(body)
        .map_err(|e| InvalidEvent::new("cloudevent", format!("not a CloudEvent: {e}")))?;
    if ce.specversion != SPEC_VERSION {
        return Err(InvalidEvent::new(
            "specversion",
            format!(
                "`{}` is not supported, expected {SPEC_VERSION}",
                ce.specversion
            ),
        ));
    }
    let missing = |field| InvalidEvent::new(field, "is missing");
    let event = Event {
        id: ce.id,
        aggregate_type: ce.aggregatetype.ok_or_else(|| missing("aggregatetype"))?,
        aggregate_id: ce.subject.ok_or_else(|| missing("subject"))?,
        aggregate_version: ce
            .aggregateversion
            .ok_or_else(|| missing("aggregateversion"))?,
        event_type: ce.ty,
        payload: match ce.data {
            Some(raw) => Payload::from_json(String::from(raw.get()))?,
            None => Payload::from_json("null")?,
        },
        occurred_at: ce.time.ok_or_else(|| missing("time"))?,
        metadata: Metadata {
            traceparent: ce.traceparent,
            correlation_id: ce.correlationid,
            causation_id: ce.causationid,
        },
    };
    event.validate()?;
    Ok(Received {
        event,
        source: ce.source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_field() {
        let event = Event::builder("Order", "o-1", 3, "OrderShipped")
            .payload(&serde_json::json!({"carrier": "ups", "parcels": [1, 2]}))
            .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .correlation_id("c-1")
            .causation_id("cmd-9")
            .build()
            .unwrap();
        let json = to_json(&event, "urn:orders");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["type"], "OrderShipped");
        assert_eq!(v["subject"], "o-1");
        assert_eq!(v["aggregateversion"], 3);
        assert_eq!(v["data"]["carrier"], "ups");
        let back = from_json(&json).unwrap();
        assert_eq!(back.event, event);
        assert_eq!(back.source, "urn:orders");
    }

    #[test]
    fn refuses_foreign_or_incomplete_events() {
        assert!(from_json("[]").is_err());
        let no_version = r#"{"specversion":"1.0","id":"0192e4a0-0000-7000-8000-000000000000",
            "source":"s","type":"T","subject":"a","time":"2024-01-01T00:00:00Z","aggregatetype":"A"}"#;
        assert_eq!(
            from_json(no_version).unwrap_err().field(),
            "aggregateversion"
        );
        let string_version = no_version.replace(
            r#""aggregatetype":"A""#,
            r#""aggregatetype":"A","aggregateversion":"4""#,
        );
        assert_eq!(
            from_json(&string_version).unwrap().event.aggregate_version,
            4
        );
        let old = string_version.replace(r#""specversion":"1.0""#, r#""specversion":"0.3""#);
        assert_eq!(from_json(&old).unwrap_err().field(), "specversion");
    }
}
