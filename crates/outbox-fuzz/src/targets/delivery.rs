//! The CloudEvents form and what a consumer receives: SQS message bodies
//! (a CloudEvent), SNS notifications around one, EventBridge events around
//! one (from an SQS target, or invoking a Lambda consumer directly).

use fastrand::Rng;
use outbox_core::cloudevents::{self, Received};
use outbox_core::InvalidEvent;
use outbox_sqs::parse_delivery;
use serde_json::Value;

use crate::corpus::{self, Seeds};
use crate::mutate::json_input;
use crate::runner::{refusal, Target, Verdict};
use crate::targets::lossy;

/// What a CloudEvent or delivery refusal may name.
const DELIVERY_NAMES: &[&str] = &[
    "`cloudevent`",
    "`specversion`",
    "`id`",
    "`aggregatetype`",
    "`subject`",
    "`aggregateversion`",
    "`time`",
    "`payload`",
    "`aggregate_type`",
    "`aggregate_id`",
    "`aggregate_version`",
    "`event_type`",
    "`body`",
    "`Message`",
];

/// Checks a decoder's answer: an accepted event is valid and survives
/// `to_json` and `parse` again unchanged; a refusal names its field.
fn judge(
    result: Result<Received, InvalidEvent>,
    parse: impl Fn(&str) -> Result<Received, InvalidEvent>,
) -> Verdict {
    match result {
        Ok(received) => {
            if let Err(e) = received.event.validate() {
                return Verdict::Broken(format!("accepted an invalid event: {e}"));
            }
            let json = cloudevents::to_json(&received.event, &received.source);
            match parse(&json) {
                Ok(back) if back == received => Verdict::Accepted,
                other => Verdict::Broken(format!(
                    "round trip changed the event: {received:?} became {other:?} (via {json})"
                )),
            }
        }
        Err(e) => {
            if e.field().is_empty() {
                return Verdict::Broken(format!("a refusal without a field: {e}"));
            }
            refusal(&e.to_string(), DELIVERY_NAMES)
        }
    }
}

/// Seeds of the CloudEvent form: the queue fixture's CloudEvent, the ones
/// inside the EventBridge and SNS fixtures, and the fixture envelopes of
/// the stream tests rendered by `to_json`.
fn cloudevent_seeds() -> Seeds {
    let mut texts = vec![corpus::CLOUDEVENT.to_owned()];
    if let Ok(eb) = serde_json::from_str::<Value>(corpus::EVENTBRIDGE) {
        if let Some(detail) = eb.get("detail") {
            texts.push(detail.to_string());
        }
    }
    if let Ok(sns) = serde_json::from_str::<Value>(corpus::SNS) {
        if let Some(message) = sns.get("Message").and_then(Value::as_str) {
            texts.push(message.to_owned());
        }
    }
    for envelope in corpus::envelopes() {
        if let Ok(event) = serde_json::from_value::<outbox_core::Event>(envelope) {
            texts.push(cloudevents::to_json(&event, "urn:orders"));
        }
    }
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    Seeds::from_texts(&refs)
}

/// `cloudevents::from_json`: the structured-mode CloudEvent.
#[derive(Debug)]
pub struct CloudEvent {
    seeds: Seeds,
}

impl CloudEvent {
    pub fn new() -> Self {
        Self {
            seeds: cloudevent_seeds(),
        }
    }
}

impl Default for CloudEvent {
    fn default() -> Self {
        Self::new()
    }
}

impl Target for CloudEvent {
    type Input = Vec<u8>;

    fn name(&self) -> &'static str {
        "cloudevent"
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
        judge(
            cloudevents::from_json(&lossy(input)),
            cloudevents::from_json,
        )
    }
}

/// Which carrier a delivery target's seeds come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    /// A CloudEvent as the SQS message body.
    Sqs,
    /// An SNS notification (without raw delivery) in the SQS message body.
    Sns,
    /// An EventBridge event: in an SQS body (rule with an SQS target), or
    /// as the JSON a Lambda consumer is invoked with.
    EventBridge,
}

/// `parse_delivery` over message bodies of one carrier (the other
/// carriers' seeds are in the mix too, at a lower rate).
#[derive(Debug)]
pub struct Delivery {
    carrier: Carrier,
    seeds: Seeds,
    others: Seeds,
}

impl Delivery {
    pub fn new(carrier: Carrier) -> Self {
        let (own, others) = match carrier {
            Carrier::Sqs => (corpus::CLOUDEVENT, [corpus::SNS, corpus::EVENTBRIDGE]),
            Carrier::Sns => (corpus::SNS, [corpus::CLOUDEVENT, corpus::EVENTBRIDGE]),
            Carrier::EventBridge => (corpus::EVENTBRIDGE, [corpus::CLOUDEVENT, corpus::SNS]),
        };
        Self {
            carrier,
            seeds: Seeds::from_texts(&[own]),
            others: Seeds::from_texts(&others),
        }
    }
}

impl Target for Delivery {
    type Input = Vec<u8>;

    fn name(&self) -> &'static str {
        match self.carrier {
            Carrier::Sqs => "sqs-delivery",
            Carrier::Sns => "sns-delivery",
            Carrier::EventBridge => "eventbridge-delivery",
        }
    }

    fn generate(&self, rng: &mut Rng) -> Vec<u8> {
        let seeds = if rng.usize(..5) == 0 {
            &self.others
        } else {
            &self.seeds
        };
        json_input(rng, &seeds.docs, &seeds.text_slices(), &self.seeds.known)
    }

    fn dump(&self, input: &Vec<u8>) -> Vec<u8> {
        input.clone()
    }

    fn check(&self, input: &Vec<u8>) -> Verdict {
        let body = lossy(input);
        let verdict = judge(parse_delivery(&body), parse_delivery);
        if self.carrier != Carrier::EventBridge || matches!(verdict, Verdict::Broken(_)) {
            return verdict;
        }
        // The Lambda consumer invoked by EventBridge: the runtime decodes
        // the bytes to JSON, the handler re-serializes and parses it.
        match serde_json::from_slice::<Value>(input) {
            Ok(value) => judge(parse_delivery(&value.to_string()), parse_delivery),
            Err(_) => verdict,
        }
    }
}
