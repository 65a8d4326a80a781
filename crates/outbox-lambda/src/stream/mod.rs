//! The `PublishEvents` handler: relays the events of a DynamoDB stream batch
//! through the core [`Relay`] and answers with a partial batch response.
//!
//! The invocation's records are a [`ClaimSource`](outbox_core::ClaimSource)
//! (see `source.rs`): per aggregate, its events in record order. The relay
//! publishes them as it publishes any store's events: one event per
//! aggregate per call, the next once the previous is confirmed, retries with
//! backoff, dead-letters what the broker refuses for good, and stops
//! starting calls in time for the invocation's deadline.
//!
//! Lambda resumes a stream batch from the lowest sequence number reported
//! failed, so the handler reports exactly one record, the first one not
//! fully handled, and never publishes a record of an aggregate after one of
//! that aggregate that failed. Other aggregates keep flowing.

mod source;

use std::time::Duration;

use outbox_core::{
    time, PublishRequest, PublishResult, Publisher, Relay, RelayConfig, RetryPolicy,
};
use outbox_dynamodb::{DecodeError, LambdaStreamEvent};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::dead_letter::DeadLetterSink;
use source::{Budget, InvocationSource};

/// Lambda's longest invocation: no deadline is further away than this, and
/// calls without one get this much time.
pub const MAX_INVOCATION: Duration = Duration::from_secs(15 * 60);

/// The invocation's deadline as an instant, from the Lambda context's
/// `deadline` (milliseconds since the epoch). A deadline already past gives
/// an instant that has passed: the handler then publishes nothing and hands
/// every record back. One further away than Lambda allows is taken as
/// [`MAX_INVOCATION`] from now.
pub fn deadline_from_epoch_ms(deadline_ms: u64) -> Instant {
    let now_ms = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
    let left = Duration::from_millis(deadline_ms.saturating_sub(now_ms)).min(MAX_INVOCATION);
    time::instant_after(Instant::now(), left)
}

/// How hard one invocation tries before handing a record back to Lambda.
#[derive(Debug, Clone, PartialEq)]
pub struct HandlerConfig {
    /// Retries of an event after a transient failure, within one invocation.
    pub entry_retries: u32,
    /// Wait before the first retry; doubled for each next one, with jitter.
    pub retry_backoff: Duration,
    /// Longest wait before a retry. A broker asking to wait longer gets the
    /// record back to Lambda instead of a blocked invocation.
    pub max_retry_backoff: Duration,
    /// Publish calls in flight at once. The relay sends one event per
    /// aggregate per call round, so this many calls of the target's batch
    /// size (10 for EventBridge) should hold a batch's widest round.
    pub publish_concurrency: usize,
    /// Longest wait for one publish call; a slower call is a failure of the
    /// target as a whole, which ends the invocation.
    pub publish_timeout: Duration,
    /// Time kept before the invocation's deadline to record outcomes and
    /// answer: no publish call runs into it.
    pub settle_margin: Duration,
}

impl Default for HandlerConfig {
    fn default() -> Self {
        Self {
            entry_retries: 3,
            retry_backoff: Duration::from_millis(50),
            max_retry_backoff: Duration::from_secs(2),
            // A 100-record batch of events of different aggregates is ten
            // EventBridge calls: all at once.
            publish_concurrency: 10,
            publish_timeout: Duration::from_secs(10),
            settle_margin: Duration::from_millis(250),
        }
    }
}

impl HandlerConfig {
    pub fn entry_retries(mut self, n: u32) -> Self {
        self.entry_retries = n;
        self
    }

    pub fn retry_backoff(mut self, first: Duration) -> Self {
        self.retry_backoff = first;
        self
    }

    pub fn max_retry_backoff(mut self, max: Duration) -> Self {
        self.max_retry_backoff = max;
        self
    }

    pub fn publish_concurrency(mut self, n: usize) -> Self {
        self.publish_concurrency = n;
        self
    }

    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    pub fn settle_margin(mut self, margin: Duration) -> Self {
        self.settle_margin = margin;
        self
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.publish_concurrency == 0 {
            return Err("publish_concurrency must be at least 1".into());
        }
        if self.publish_timeout.is_zero() {
            return Err("publish_timeout must be greater than zero".into());
        }
        if self.retry_backoff > self.max_retry_backoff {
            return Err("retry_backoff must not exceed max_retry_backoff".into());
        }
        // Nothing in one invocation can wait longer than the invocation.
        for (setting, value) in [
            ("publish_timeout", self.publish_timeout),
            ("max_retry_backoff", self.max_retry_backoff),
            ("settle_margin", self.settle_margin),
        ] {
            time::check_at_most(setting, value, MAX_INVOCATION)?;
        }
        Ok(())
    }

    /// The relay over one invocation's records: the handler's backoff, and
    /// so many attempts that the relay never gives up on its own (giving a
    /// record back to Lambda is the source's call).
    fn relay_config(&self) -> RelayConfig {
        let retry = RetryPolicy {
            initial: self.retry_backoff,
            multiplier: 2.0,
            // Not a cap on backoff (the attempts shown to the relay are
            // capped instead), so that a broker's longer retry-after comes
            // through and the record goes back to Lambda.
            max_delay: time::MAX_RETRY_DELAY,
            jitter: 0.5,
            max_attempts: u32::MAX,
        };
        RelayConfig::default()
            // The whole invocation is one claim.
            .batch_size(usize::MAX)
            // The deadline bounds the invocation, not a lease: nobody else
            // holds these records while it runs.
            .lease(
                MAX_INVOCATION
                    .saturating_add(self.publish_timeout)
                    .saturating_add(self.settle_margin)
                    .saturating_add(Duration::from_secs(1)),
            )
            .publish_timeout(self.publish_timeout)
            .publish_concurrency(self.publish_concurrency)
            .settle_margin(self.settle_margin)
            .retry(retry)
    }

    fn budget(&self) -> Budget {
        Budget {
            entry_retries: self.entry_retries,
            max_retry_backoff: self.max_retry_backoff,
            attempts_shown: doublings_within(self.retry_backoff, self.max_retry_backoff),
        }
    }
}

/// How often `first` can be doubled and stay within `max`: the relay's
/// backoff after that many failures is still no longer than `max`.
fn doublings_within(first: Duration, max: Duration) -> u32 {
    let mut n = 0;
    let mut delay = first;
    while n < 32 {
        match delay.checked_mul(2) {
            Some(next) if next <= max => {
                delay = next;
                n += 1;
            }
            _ => break,
        }
    }
    n
}

/// The partial batch response of a stream event source mapping with
/// `ReportBatchItemFailures`: `{"batchItemFailures":[{"itemIdentifier":"<SequenceNumber>"}]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamBatchResponse {
    #[serde(rename = "batchItemFailures")]
    pub batch_item_failures: Vec<BatchItemFailure>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchItemFailure {
    #[serde(rename = "itemIdentifier")]
    pub item_identifier: String,
}

impl StreamBatchResponse {
    /// Everything was handled: Lambda moves past the batch.
    pub fn success() -> Self {
        Self::default()
    }

    /// Lambda retries from this sequence number onward. An empty identifier
    /// makes Lambda retry the whole batch.
    pub fn retry_from(sequence_number: impl Into<String>) -> Self {
        Self {
            batch_item_failures: vec![BatchItemFailure {
                item_identifier: sequence_number.into(),
            }],
        }
    }

    /// The sequence number Lambda will retry from, if any.
    pub fn retry_sequence_number(&self) -> Option<&str> {
        self.batch_item_failures
            .first()
            .map(|f| f.item_identifier.as_str())
    }

    pub fn is_success(&self) -> bool {
        self.batch_item_failures.is_empty()
    }
}

impl From<StreamBatchResponse> for aws_lambda_events::event::streams::DynamoDbEventResponse {
    fn from(response: StreamBatchResponse) -> Self {
        use aws_lambda_events::event::streams::DynamoDbBatchItemFailure;
        let mut out = Self::default();
        for failure in response.batch_item_failures {
            let mut item = DynamoDbBatchItemFailure::default();
            item.item_identifier = Some(failure.item_identifier);
            out.batch_item_failures.push(item);
        }
        out
    }
}

/// What one invocation did, for logs and benchmarks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct InvocationReport {
    pub response: StreamBatchResponse,
    pub records: usize,
    /// REMOVE, TTL deletions and other records without events.
    pub ignored: usize,
    /// Undecodable records (kept in the dead-letter sink unless it failed).
    pub malformed: usize,
    pub published: usize,
    /// Events refused for good and kept in the dead-letter sink.
    pub dead_lettered: usize,
    /// Publish attempts repeated after a transient failure.
    pub retries: usize,
    /// Records not fully handled (failed, held back behind a failure, or not
    /// reached before the deadline); Lambda hands them over again.
    pub unfinished: usize,
    /// The target was down (unreachable, timed out, throttled the call...):
    /// its last error. The invocation ended early without spending any
    /// event's retries.
    pub outage: Option<String>,
}

/// The `PublishEvents` Lambda handler, callable without the Lambda runtime.
#[derive(Debug)]
pub struct StreamRelayHandler<P, D> {
    publisher: P,
    dead_letters: D,
    config: HandlerConfig,
}

impl<P: Publisher, D: DeadLetterSink> StreamRelayHandler<P, D> {
    pub fn new(publisher: P, dead_letters: D) -> Self {
        Self {
            publisher,
            dead_letters,
            config: HandlerConfig::default(),
        }
    }

    /// Replaces the configuration. It is checked when an event is handled:
    /// call [`HandlerConfig::validate`] at start to fail early.
    pub fn config(mut self, config: HandlerConfig) -> Self {
        self.config = config;
        self
    }

    pub fn handler_config(&self) -> &HandlerConfig {
        &self.config
    }

    pub fn publisher(&self) -> &P {
        &self.publisher
    }

    pub fn dead_letters(&self) -> &D {
        &self.dead_letters
    }

    /// Handles one Lambda DynamoDB stream event with Lambda's longest time
    /// to do it in (tests, local runs); see [`handle_until`](Self::handle_until).
    pub async fn handle(&self, event: &LambdaStreamEvent) -> StreamBatchResponse {
        self.process(event).await.response
    }

    /// Handles one event, answering before `deadline` (see
    /// [`deadline_from_epoch_ms`] for the Lambda context's deadline).
    pub async fn handle_until(
        &self,
        event: &LambdaStreamEvent,
        deadline: Instant,
    ) -> StreamBatchResponse {
        self.process_until(event, deadline).await.response
    }

    /// Parses and handles a Lambda DynamoDB stream event given as JSON. An
    /// event that is not a stream event at all is an error: no record can be
    /// named, so the invocation should fail as a whole.
    pub async fn handle_json(&self, json: &str) -> Result<StreamBatchResponse, DecodeError> {
        let event = LambdaStreamEvent::from_json(json)?;
        Ok(self.handle(&event).await)
    }

    /// Handles one event with Lambda's longest time to do it in, and says
    /// what happened.
    pub async fn process(&self, event: &LambdaStreamEvent) -> InvocationReport {
        let deadline = time::instant_after(Instant::now(), MAX_INVOCATION);
        self.process_until(event, deadline).await
    }

    /// Handles one event and says what happened. No publish call runs past
    /// `deadline` less the settle margin; what was not published by then is
    /// reported, so Lambda hands it over again rather than timing out and
    /// replaying the whole batch.
    pub async fn process_until(
        &self,
        event: &LambdaStreamEvent,
        deadline: Instant,
    ) -> InvocationReport {
        let source = InvocationSource::new(event, &self.dead_letters, self.config.budget());
        let mut outage = None;
        match self.config.validate() {
            Err(error) => {
                tracing::error!(%error, "stream relay: invalid handler configuration; handing the batch back");
            }
            Ok(()) => {
                match Relay::new(&source, ByRef(&self.publisher), self.config.relay_config()) {
                    Err(error) => {
                        tracing::error!(%error, "stream relay: invalid relay configuration; handing the batch back");
                    }
                    Ok(relay) => {
                        if let Err(error) = relay.drain_until(deadline).await {
                            // The source itself never fails; kept for the
                            // record, and the unfinished records go back.
                            tracing::error!(%error, "stream relay: relay failed");
                        }
                        if let Some(down) = relay.outage() {
                            tracing::warn!(error = %down.last_error, "stream relay: target unavailable; handing the rest of the batch back");
                            outage = Some(down.last_error);
                        }
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            tracing::warn!("stream relay: answered past the invocation deadline");
        }
        let tally = source.tally();
        if tally.unfinished > 0 && outage.is_none() {
            if let Some(error) = source.last_error() {
                tracing::debug!(%error, "stream relay: last failure of the batch");
            }
        }
        InvocationReport {
            response: tally.resume_from.map_or_else(
                StreamBatchResponse::success,
                StreamBatchResponse::retry_from,
            ),
            records: tally.records,
            ignored: tally.ignored,
            malformed: tally.malformed,
            published: tally.published,
            dead_lettered: tally.dead_lettered,
            retries: tally.retries,
            unfinished: tally.unfinished,
            outage,
        }
    }
}

/// The handler's publisher lent to the relay of one invocation.
struct ByRef<'a, P>(&'a P);

impl<P: Publisher> Publisher for ByRef<'_, P> {
    fn max_batch_size(&self) -> usize {
        self.0.max_batch_size()
    }

    fn publish(
        &self,
        request: PublishRequest<'_>,
    ) -> impl std::future::Future<Output = Vec<PublishResult>> + Send {
        self.0.publish(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_has_the_lambda_shape() {
        assert_eq!(
            serde_json::to_string(&StreamBatchResponse::retry_from("42")).unwrap(),
            r#"{"batchItemFailures":[{"itemIdentifier":"42"}]}"#
        );
        assert_eq!(
            serde_json::to_string(&StreamBatchResponse::success()).unwrap(),
            r#"{"batchItemFailures":[]}"#
        );
        let sdk: aws_lambda_events::event::streams::DynamoDbEventResponse =
            StreamBatchResponse::retry_from("42").into();
        assert_eq!(
            serde_json::to_value(&sdk).unwrap(),
            serde_json::to_value(StreamBatchResponse::retry_from("42")).unwrap()
        );
    }

    #[test]
    fn backoff_stays_within_its_bound() {
        let c = HandlerConfig::default();
        // 50 ms doubled five times is 1.6 s, within 2 s.
        assert_eq!(c.budget().attempts_shown, 5);
        assert_eq!(doublings_within(Duration::ZERO, Duration::from_secs(1)), 32);
        assert_eq!(
            doublings_within(Duration::MAX, Duration::MAX),
            0,
            "no overflow"
        );
        let relay = c.relay_config();
        assert!(relay.validate().is_ok(), "{:?}", relay.validate());
        for failures in 1..=c.budget().attempts_shown.saturating_add(1) {
            // The top of the jitter range: the longest delay it can draw.
            assert!(relay.retry.delay(failures, 0.999_999) <= c.max_retry_backoff);
        }
    }

    #[test]
    fn absurd_settings_are_refused() {
        assert!(HandlerConfig::default().validate().is_ok());
        for bad in [
            HandlerConfig::default().publish_concurrency(0),
            HandlerConfig::default().publish_timeout(Duration::ZERO),
            HandlerConfig::default().publish_timeout(Duration::MAX),
            HandlerConfig::default().max_retry_backoff(Duration::MAX),
            HandlerConfig::default().settle_margin(Duration::MAX),
            HandlerConfig::default().retry_backoff(Duration::from_secs(3)),
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        // The longest accepted settings still make a valid relay.
        let longest = HandlerConfig::default()
            .publish_timeout(MAX_INVOCATION)
            .max_retry_backoff(MAX_INVOCATION)
            .settle_margin(MAX_INVOCATION);
        assert!(longest.validate().is_ok());
        assert!(longest.relay_config().validate().is_ok());
    }

    #[test]
    fn deadlines_from_the_lambda_context_saturate() {
        let now = Instant::now();
        assert!(deadline_from_epoch_ms(0) <= Instant::now(), "past: now");
        let far = deadline_from_epoch_ms(u64::MAX);
        assert!(far > now && far <= Instant::now() + MAX_INVOCATION);
        let in_a_minute = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap() + 60_000;
        let d = deadline_from_epoch_ms(in_a_minute);
        assert!(d > now + Duration::from_secs(55) && d <= now + Duration::from_secs(61));
    }
}
