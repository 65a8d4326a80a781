//! Reading what arrives in a queue back into events.

use outbox_core::cloudevents::{self, Received};
use outbox_core::InvalidEvent;
use serde::Deserialize;
use serde_json::value::RawValue;

/// The fields that tell the three body shapes apart.
#[derive(Deserialize)]
struct Shape {
    specversion: Option<serde::de::IgnoredAny>,
    #[serde(rename = "Type")]
    sns_type: Option<String>,
    #[serde(rename = "Message")]
    sns_message: Option<String>,
    #[serde(rename = "detail-type")]
    detail_type: Option<serde::de::IgnoredAny>,
    detail: Option<Box<RawValue>>,
}

/// Parses a message body into the event it carries. Three shapes arrive:
///
/// - a structured-mode CloudEvent: what [`SqsPublisher`](crate::SqsPublisher)
///   sends, and what an SNS raw-delivery subscription passes on;
/// - an EventBridge event (`{"version":"0","detail-type":..,"source":..,
///   "detail":{..}}`) whose `detail` is the CloudEvent: what a rule with an
///   SQS target delivers. EventBridge re-encodes `detail`, so its `data`
///   is read back with insignificant whitespace removed;
/// - an SNS notification (`{"Type":"Notification","Message":"<CloudEvent>"}`)
///   from a subscription without raw delivery.
pub fn parse_delivery(body: &str) -> Result<Received, InvalidEvent> {
    let shape: Shape = serde_json::from_str(body)
        .map_err(|e| InvalidEvent::new("body", format!("not a JSON object: {e}")))?;
    if shape.specversion.is_some() {
        return cloudevents::from_json(body);
    }
    if shape.sns_type.as_deref() == Some("Notification") {
        let message = shape
            .sns_message
            .ok_or_else(|| InvalidEvent::new("Message", "is missing from the SNS notification"))?;
        return cloudevents::from_json(&message);
    }
    if let (Some(_), Some(detail)) = (shape.detail_type, shape.detail) {
        return cloudevents::from_json(&minify(detail.get()));
    }
    Err(InvalidEvent::new(
        "body",
        "is neither a CloudEvent, an EventBridge event nor an SNS notification",
    ))
}

/// Removes whitespace outside strings from valid JSON text, keeping key
/// order and number spelling as they are.
fn minify(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minify_keeps_strings_and_order() {
        assert_eq!(
            minify("{ \"b\" : [1, 2],\n \"a\": \"x \\\" y\" }"),
            "{\"b\":[1,2],\"a\":\"x \\\" y\"}"
        );
    }

    #[test]
    fn refuses_other_bodies() {
        assert_eq!(parse_delivery("hello").unwrap_err().field(), "body");
        assert_eq!(parse_delivery("{\"a\":1}").unwrap_err().field(), "body");
        assert_eq!(
            parse_delivery("{\"Type\":\"Notification\"}")
                .unwrap_err()
                .field(),
            "Message"
        );
        // An SNS notification whose message is not a CloudEvent.
        let not_ce = r#"{"Type":"Notification","Message":"{\"a\":1}"}"#;
        assert_eq!(parse_delivery(not_ce).unwrap_err().field(), "cloudevent");
    }
}
