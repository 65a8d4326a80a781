//! The `PublishEvents` handler against real stream payloads and injected
//! per-entry failures.

#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::{Event, PublishRequest, PublishResult, Publisher};
use outbox_dynamodb::LambdaStreamEvent;
use outbox_lambda::testing::{stream_event, stream_record};
use outbox_lambda::{HandlerConfig, MemoryDeadLetters, StreamBatchResponse, StreamRelayHandler};
use outbox_testkit::{order_event, Fault, FaultyPublisher, RecordingPublisher};
use serde_json::Value;

fn fixture(name: &str) -> Vec<Value> {
    let path = format!("{}/tests/fixtures/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    let event: Value = serde_json::from_str(&text).unwrap();
    event["Records"].as_array().unwrap().clone()
}

fn event_of(records: Vec<Value>) -> LambdaStreamEvent {
    stream_event(records)
}

fn seq(position: usize) -> String {
    format!("{:030}", 1000 + position)
}

/// Records of one event each, at positions 0.., for the aggregates given in
/// order; versions count up per aggregate.
fn interleaved(aggregates: &[&str], per_aggregate: u64) -> (Vec<Value>, Vec<Event>) {
    let mut records = Vec::new();
    let mut events = Vec::new();
    for version in 1..=per_aggregate {
        for agg in aggregates {
            let event = order_event(agg, version, "OrderUpdated");
            records.push(
                stream_record("MODIFY", &seq(records.len()), std::slice::from_ref(&event)).unwrap(),
            );
            events.push(event);
        }
    }
    (records, events)
}

fn fast() -> HandlerConfig {
    HandlerConfig::default().retry_backoff(Duration::from_millis(2))
}

type Handler = StreamRelayHandler<FaultyPublisher<RecordingPublisher>, MemoryDeadLetters>;

fn handler(max_batch: usize) -> Handler {
    let publisher = FaultyPublisher::new(RecordingPublisher::new().with_max_batch_size(max_batch));
    StreamRelayHandler::new(publisher, MemoryDeadLetters::new()).config(fast())
}

fn published(h: &Handler) -> Vec<(String, u64)> {
    h.publisher().inner().versions()
}

fn versions_of(p: &[(String, u64)], agg: &str) -> Vec<u64> {
    p.iter()
        .filter(|(a, _)| a == agg)
        .map(|(_, v)| *v)
        .collect()
}

#[tokio::test]
async fn fixtures_publish_inserts_and_modifies_and_ignore_removals() {
    let h = handler(10);
    let mut records = fixture("insert_one_event");
    records.extend(fixture("modify_several_events"));
    records.extend(fixture("remove"));
    records.extend(fixture("ttl_delete"));
    let report = h.process(&event_of(records)).await;
    assert!(report.response.is_success(), "{report:?}");
    assert_eq!(
        (report.records, report.ignored, report.published),
        (4, 2, 4)
    );
    let received = h.publisher().inner().received();
    let types: Vec<_> = received.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        ["OrderCreated", "OrderPaid", "OrderPacked", "OrderShipped"]
    );
    assert_eq!(
        received[0].id.to_string(),
        "019aaa51-2c3e-7d41-9b1e-5c7f0a3d2e11"
    );
    assert_eq!(
        received[0].payload.to_value::<Value>().unwrap()["total"],
        3998
    );
    assert_eq!(
        received[3].metadata.traceparent.as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert!(h.dead_letters().records().is_empty());
}

#[tokio::test]
async fn handle_json_answers_the_lambda_shape() {
    let h = handler(10);
    let path = format!(
        "{}/tests/fixtures/modify_several_events.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let response = h
        .handle_json(&std::fs::read_to_string(path).unwrap())
        .await
        .unwrap();
    assert_eq!(
        serde_json::to_string(&response).unwrap(),
        r#"{"batchItemFailures":[]}"#
    );
    assert_eq!(published(&h).len(), 3);
    assert!(h.handle_json(r#"{"Items": []}"#).await.is_err());
    assert!(h.handle_json("not json").await.is_err());
}

#[tokio::test]
async fn malformed_records_are_dead_lettered_raw_and_not_reported() {
    let h = handler(10);
    let mut records = fixture("malformed_missing_new_image");
    records.extend(fixture("insert_one_event"));
    records.extend(fixture("malformed_wrong_types"));
    records.extend(fixture("malformed_bad_event_json"));
    records.extend(fixture("malformed_missing_sequence_number"));
    records.extend(fixture("modify_several_events"));
    let raw: Vec<String> = records.iter().map(Value::to_string).collect();
    let report = h.process(&event_of(records)).await;
    assert!(report.response.is_success(), "{report:?}");
    assert_eq!((report.malformed, report.published), (4, 4));
    assert_eq!(versions_of(&published(&h), "o-1001"), [1, 2, 3, 4]);

    let mut dead = h.dead_letters().records();
    dead.sort_by(|a, b| a.sequence_number.cmp(&b.sequence_number));
    let seqs: Vec<_> = dead.iter().map(|d| d.sequence_number.as_str()).collect();
    assert_eq!(
        &seqs[..3],
        [
            "4421584900000000017450439400",
            "4421585000000000017450439511",
            "4421585100000000017450439622"
        ]
    );
    // No sequence number: kept under a stable stand-in name.
    assert!(seqs[3].starts_with("no-sequence-number-"), "{}", seqs[3]);
    for d in &dead {
        assert!(raw.contains(&d.raw_record), "kept as it arrived");
    }
    let error_of = |s: &str| {
        dead.iter()
            .find(|d| d.sequence_number == s)
            .unwrap()
            .error
            .clone()
    };
    assert!(error_of("4421584900000000017450439400").contains("NewImage"));
    assert!(error_of("4421585000000000017450439511").contains("aggregate_id"));
    assert!(error_of("4421585100000000017450439622").contains("events"));
    assert!(dead[3].error.contains("SequenceNumber"));

    // The same batch again names the record without a sequence number the same way.
    let h2 = handler(10);
    h2.process(&event_of(fixture("malformed_missing_sequence_number")))
        .await;
    assert_eq!(h2.dead_letters().records()[0].sequence_number, seqs[3]);
}

#[tokio::test]
async fn dead_letter_failure_for_a_malformed_record_reports_it() {
    let h = handler(10);
    h.dead_letters().set_failing(true);
    let mut records = fixture("insert_one_event");
    records.extend(fixture("malformed_wrong_types"));
    records.extend(fixture("malformed_bad_event_json"));
    let response = h.handle(&event_of(records)).await;
    assert_eq!(
        response,
        StreamBatchResponse::retry_from("4421585000000000017450439511")
    );
    assert_eq!(published(&h), [("o-1001".to_owned(), 1)]);
}

#[tokio::test]
async fn record_without_sequence_number_that_cannot_be_kept_resumes_before_it() {
    let h = handler(10);
    h.dead_letters().set_failing(true);
    let mut records = fixture("insert_one_event");
    records.extend(fixture("malformed_missing_sequence_number"));
    let response = h.handle(&event_of(records.clone())).await;
    assert_eq!(
        response,
        StreamBatchResponse::retry_from("4421584500000000017450439091")
    );
    // First in the batch: only the whole batch can be retried.
    let response = h
        .handle(&event_of(records.into_iter().rev().collect()))
        .await;
    assert_eq!(response, StreamBatchResponse::retry_from(""));
    assert_eq!(
        serde_json::to_string(&response).unwrap(),
        r#"{"batchItemFailures":[{"itemIdentifier":""}]}"#
    );
}

#[tokio::test]
async fn exhausted_transient_failure_reports_its_record_and_holds_its_aggregate() {
    let h = handler(10);
    let (records, events) = interleaved(&["a", "b", "c"], 3);
    // a's version 2 (position 3) fails more often than the handler retries.
    h.publisher()
        .script(events[3].id, vec![Fault::Transient; 4]);
    let report = h.process(&event_of(records)).await;
    assert_eq!(report.response, StreamBatchResponse::retry_from(seq(3)));
    let p = published(&h);
    assert_eq!(
        versions_of(&p, "a"),
        [1],
        "nothing of `a` after its failed record"
    );
    assert_eq!(versions_of(&p, "b"), [1, 2, 3]);
    assert_eq!(versions_of(&p, "c"), [1, 2, 3]);
    assert_eq!((report.retries, report.unfinished), (3, 2));
}

#[tokio::test]
async fn the_first_failed_record_is_the_one_reported() {
    let h = handler(10);
    let (records, events) = interleaved(&["a", "b", "c"], 3);
    // b fails at position 4 (version 2), c at position 2 (version 1).
    h.publisher()
        .script(events[4].id, vec![Fault::Transient; 9]);
    h.publisher()
        .script(events[2].id, vec![Fault::Transient; 9]);
    let response = h.handle(&event_of(records)).await;
    assert_eq!(response.batch_item_failures.len(), 1);
    assert_eq!(response, StreamBatchResponse::retry_from(seq(2)));
    let p = published(&h);
    assert_eq!(
        versions_of(&p, "a"),
        [1, 2, 3],
        "other aggregates still flow"
    );
    assert_eq!(versions_of(&p, "b"), [1]);
    assert!(versions_of(&p, "c").is_empty());
}

#[tokio::test]
async fn transient_failures_retried_within_the_invocation_are_not_reported() {
    let h = handler(10);
    let (records, events) = interleaved(&["a", "b"], 3);
    h.publisher()
        .script(events[0].id, vec![Fault::Transient, Fault::LostAck]);
    h.publisher().script(
        events[3].id,
        vec![Fault::RetryAfter(Duration::from_millis(5))],
    );
    let report = h.process(&event_of(records)).await;
    assert!(report.response.is_success(), "{report:?}");
    assert_eq!(report.retries, 3);
    let p = published(&h);
    // The lost acknowledgement makes a duplicate, still in order.
    assert_eq!(versions_of(&p, "a"), [1, 1, 2, 3]);
    assert_eq!(versions_of(&p, "b"), [1, 2, 3]);
}

#[tokio::test]
async fn retry_after_beyond_the_limit_hands_the_record_back() {
    let h = handler(10);
    let (records, events) = interleaved(&["a"], 2);
    h.publisher().script(
        events[0].id,
        vec![Fault::RetryAfter(Duration::from_secs(60))],
    );
    let response = h.handle(&event_of(records)).await;
    assert_eq!(response, StreamBatchResponse::retry_from(seq(0)));
    assert!(published(&h).is_empty());
}

#[tokio::test]
async fn permanent_failure_is_dead_lettered_and_its_aggregate_goes_on() {
    let h = handler(10);
    let (records, events) = interleaved(&["a", "b"], 3);
    h.publisher().script(events[2].id, [Fault::Permanent]);
    let report = h.process(&event_of(records)).await;
    assert!(report.response.is_success(), "{report:?}");
    assert_eq!(report.dead_lettered, 1);
    let p = published(&h);
    assert_eq!(versions_of(&p, "a"), [1, 3]);
    assert_eq!(versions_of(&p, "b"), [1, 2, 3]);
    let dead = h.dead_letters().events();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, events[2]);
    assert_eq!(dead[0].1, 1);
    assert!(dead[0].2.contains("permanent"), "{}", dead[0].2);
}

#[tokio::test]
async fn permanent_failure_that_cannot_be_dead_lettered_is_reported() {
    let h = handler(10);
    let (records, events) = interleaved(&["a", "b"], 3);
    h.publisher().script(events[2].id, [Fault::Permanent]);
    h.dead_letters().set_failing(true);
    let response = h.handle(&event_of(records)).await;
    assert_eq!(response, StreamBatchResponse::retry_from(seq(2)));
    let p = published(&h);
    assert_eq!(versions_of(&p, "a"), [1]);
    assert_eq!(versions_of(&p, "b"), [1, 2, 3]);
}

#[tokio::test]
async fn several_events_of_one_record_fail_mid_record() {
    let h = handler(10);
    let first: Vec<Event> = (1..=3)
        .map(|v| order_event("a", v, "OrderUpdated"))
        .collect();
    let second = vec![order_event("a", 4, "OrderUpdated")];
    let other = vec![order_event("b", 1, "OrderCreated")];
    h.publisher().script(first[1].id, vec![Fault::Transient; 4]);
    let records = vec![
        stream_record("MODIFY", &seq(0), &first).unwrap(),
        stream_record("INSERT", &seq(1), &other).unwrap(),
        stream_record("MODIFY", &seq(2), &second).unwrap(),
    ];
    let response = h.handle(&event_of(records)).await;
    assert_eq!(response, StreamBatchResponse::retry_from(seq(0)));
    let p = published(&h);
    assert_eq!(versions_of(&p, "a"), [1]);
    assert_eq!(versions_of(&p, "b"), [1]);
}

/// Lambda's side of a partial batch response: re-invoke with the records
/// from the reported one onward until none is reported.
#[tokio::test]
async fn lambda_retries_deliver_everything_in_order() {
    let h = handler(4);
    let (records, events) = interleaved(&["a", "b", "c", "d", "e"], 6);
    for (i, e) in events.iter().enumerate() {
        if i % 7 == 3 {
            h.publisher().script(e.id, vec![Fault::Transient; 4]);
        }
    }
    let mut from = 0;
    let mut invocations = 0;
    loop {
        invocations += 1;
        assert!(invocations < 20, "no progress");
        let response = h.handle(&event_of(records[from..].to_vec())).await;
        match response.retry_sequence_number() {
            None => break,
            Some(s) => from = (0..records.len()).find(|i| seq(*i) == s).unwrap(),
        }
    }
    assert!(invocations > 1);
    let p = published(&h);
    for agg in ["a", "b", "c", "d", "e"] {
        let mut first_seen = Vec::new();
        for v in versions_of(&p, agg) {
            if !first_seen.contains(&v) {
                assert!(
                    first_seen.iter().all(|s| *s < v),
                    "{agg}: {v} after a newer version"
                );
                first_seen.push(v);
            }
        }
        assert_eq!(first_seen, [1, 2, 3, 4, 5, 6], "{agg}");
    }
}

/// Remembers every call's events.
#[derive(Clone, Default)]
struct Calls {
    calls: Arc<Mutex<Vec<Vec<Event>>>>,
    inner: RecordingPublisher,
}

impl Publisher for Calls {
    fn max_batch_size(&self) -> usize {
        3
    }

    async fn publish(&self, request: PublishRequest<'_>) -> Vec<PublishResult> {
        self.calls.lock().unwrap().push(request.events.to_vec());
        tokio::time::sleep(Duration::from_millis(2)).await;
        self.inner.publish(request).await
    }
}

#[tokio::test]
async fn calls_never_hold_two_events_of_one_aggregate_and_fill_across_aggregates() {
    let calls = Calls::default();
    let h = StreamRelayHandler::new(calls.clone(), MemoryDeadLetters::new()).config(fast());
    let (records, _) = interleaved(&["a", "b", "c", "d", "e", "f", "g"], 4);
    assert!(h.handle(&event_of(records)).await.is_success());
    let calls = calls.calls.lock().unwrap().clone();
    assert_eq!(calls.iter().map(Vec::len).sum::<usize>(), 28);
    for call in &calls {
        assert!(call.len() <= 3);
        let aggregates: HashSet<_> = call.iter().map(|e| &e.aggregate_id).collect();
        assert_eq!(
            aggregates.len(),
            call.len(),
            "two events of one aggregate in a call"
        );
    }
    assert_eq!(calls[0].len(), 3, "calls are filled across aggregates");
}

#[tokio::test]
async fn empty_batch_succeeds() {
    let h = handler(10);
    assert!(h.handle(&event_of(vec![])).await.is_success());
}

/// Takes `delay` for every call; what it publishes counts only once the
/// call completes, as a broker's acknowledgement does.
#[derive(Clone)]
struct Slow {
    delay: Duration,
    inner: RecordingPublisher,
}

impl Publisher for Slow {
    fn max_batch_size(&self) -> usize {
        10
    }

    async fn publish(&self, request: PublishRequest<'_>) -> Vec<PublishResult> {
        tokio::time::sleep(self.delay).await;
        self.inner.publish(request).await
    }
}

#[tokio::test]
async fn a_handler_near_its_deadline_answers_in_time_with_the_first_unsettled_record() {
    let slow = Slow {
        delay: Duration::from_millis(300),
        inner: RecordingPublisher::new(),
    };
    let h = StreamRelayHandler::new(slow.clone(), MemoryDeadLetters::new()).config(fast());
    // One deep aggregate: one call per version, 300 ms each.
    let (records, _) = interleaved(&["deep"], 10);
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_secs(1);
    let report = h.process_until(&event_of(records), deadline).await;
    let answered = started.elapsed();
    assert!(
        answered < Duration::from_secs(1),
        "answered after the deadline: {answered:?}"
    );
    let from = report.response.retry_sequence_number().unwrap().to_owned();
    let reported = (0..10).find(|i| seq(*i) == from).unwrap();
    let p = slow.inner.versions();
    let versions = versions_of(&p, "deep");
    // Versions are 1-based: record `reported` holds version `reported + 1`.
    assert_eq!(
        versions,
        (1..=reported as u64).collect::<Vec<_>>(),
        "exactly the records before the reported one were published"
    );
    assert!(reported >= 2, "it used the time it had: {reported}");
    assert_eq!(report.unfinished, 10 - reported);
}

#[tokio::test]
async fn a_deadline_already_past_publishes_nothing_and_hands_everything_back() {
    let h = handler(10);
    let mut records = fixture("insert_one_event");
    records.extend(fixture("malformed_wrong_types"));
    records.extend(fixture("modify_several_events"));
    let report = h
        .process_until(&event_of(records), tokio::time::Instant::now())
        .await;
    assert_eq!(
        report.response,
        StreamBatchResponse::retry_from("4421584500000000017450439091")
    );
    assert_eq!((report.published, report.unfinished), (0, 3));
    assert!(published(&h).is_empty());
    assert!(h.dead_letters().records().is_empty());
    // A deadline from the Lambda context that has passed does the same.
    let late = outbox_lambda::deadline_from_epoch_ms(0);
    let again = h
        .process_until(&event_of(fixture("insert_one_event")), late)
        .await;
    assert_eq!(again.published, 0);
    assert!(!again.response.is_success());
}

/// Every call fails as a whole, as a broker that cannot be reached.
#[derive(Clone, Default)]
struct Down {
    calls: Arc<Mutex<usize>>,
}

impl Publisher for Down {
    fn max_batch_size(&self) -> usize {
        10
    }

    async fn publish(&self, request: PublishRequest<'_>) -> Vec<PublishResult> {
        *self.calls.lock().unwrap() += 1;
        outbox_core::publish::fail_all(
            &request,
            outbox_core::PublishError::unavailable("connection refused"),
        )
    }
}

#[tokio::test]
async fn an_unreachable_target_ends_the_invocation_without_spending_retries() {
    let down = Down::default();
    let h = StreamRelayHandler::new(down.clone(), MemoryDeadLetters::new()).config(fast());
    let (records, _) = interleaved(&["a", "b", "c"], 4);
    let started = tokio::time::Instant::now();
    let report = h.process(&event_of(records)).await;
    assert!(started.elapsed() < Duration::from_secs(1), "ended at once");
    assert_eq!(report.response, StreamBatchResponse::retry_from(seq(0)));
    assert_eq!(
        (report.published, report.retries, report.dead_lettered),
        (0, 0, 0)
    );
    assert_eq!(report.unfinished, 12);
    assert!(report.outage.unwrap().contains("connection refused"));
    assert_eq!(*down.calls.lock().unwrap(), 1, "one call, then it stopped");
    assert!(h.dead_letters().events().is_empty());
}

#[tokio::test]
async fn a_bad_configuration_hands_the_batch_back_instead_of_guessing() {
    let h = handler(10).config(HandlerConfig::default().publish_concurrency(0));
    let report = h.process(&event_of(fixture("insert_one_event"))).await;
    assert_eq!(
        report.response,
        StreamBatchResponse::retry_from("4421584500000000017450439091")
    );
    assert!(published(&h).is_empty());
}
