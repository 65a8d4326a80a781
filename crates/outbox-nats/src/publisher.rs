//! Publishing to a JetStream stream: every message sent, then every ack awaited.

use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::context::{CreateStreamErrorKind, GetStreamErrorKind, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::{self, stream};
use async_nats::{Client, HeaderMap};
use outbox_core::cloudevents::{self, STRUCTURED_CONTENT_TYPE};
use outbox_core::publish::{fail_all, DEFAULT_SOURCE};
use outbox_core::{Event, PublishError, PublishRequest, PublishResult, Publisher};

use crate::error::NatsError;
use crate::subject::{covers, SubjectTemplate};

/// Header carrying the event id: JetStream drops a second message with the
/// same id within the stream's duplicate window (2 minutes by default).
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";
/// Header naming the stream the message must land in: a subject that
/// belongs to another stream is refused instead of stored there.
pub const EXPECTED_STREAM_HEADER: &str = "Nats-Expected-Stream";
/// Header naming the body's media type.
pub const CONTENT_TYPE_HEADER: &str = "Content-Type";
/// W3C trace context header, copied from the event's metadata.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// Events a call takes by default. The relay never puts two events of one
/// aggregate in a call, so they are all in flight at once.
pub const DEFAULT_MAX_BATCH_SIZE: usize = 100;

/// How long a publish ack is awaited by default before the server counts
/// as unavailable.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// The NATS protocol's header block before the first header (`NATS/1.0\r\n`)
/// and after the last (`\r\n`): the server counts headers in `max_payload`.
const HEADER_BLOCK_OVERHEAD: usize = "NATS/1.0\r\n".len() + "\r\n".len();

/// Publishes events to a JetStream stream, the CloudEvent JSON as the body.
///
/// Each message gets `Nats-Msg-Id` = the event id, so the server itself drops
/// a re-published event within the stream's duplicate window. A call sends
/// all its messages, then awaits all their acks.
#[derive(Debug, Clone)]
pub struct NatsPublisher {
    client: Client,
    js: jetstream::Context,
    stream: String,
    subject: SubjectTemplate,
    source: String,
    create_stream: bool,
    stream_config: Option<stream::Config>,
    max_entry_bytes: Option<usize>,
    max_batch_size: usize,
    ack_timeout: Duration,
}

fn context(client: &Client, ack_timeout: Duration) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(ack_timeout)
        .build(client.clone())
}

impl NatsPublisher {
    /// A publisher on `client` for the stream named `stream`, with the
    /// default subject template. Call [`check`](Self::check) at start.
    pub fn new(client: Client, stream: impl Into<String>) -> Self {
        Self {
            js: context(&client, DEFAULT_ACK_TIMEOUT),
            client,
            stream: stream.into(),
            subject: SubjectTemplate::default(),
            source: DEFAULT_SOURCE.to_owned(),
            create_stream: true,
            stream_config: None,
            max_entry_bytes: None,
            max_batch_size: DEFAULT_MAX_BATCH_SIZE,
            ack_timeout: DEFAULT_ACK_TIMEOUT,
        }
    }

    /// Connects to `url` (`nats://host:port`) and makes a publisher for
    /// `stream`. The client reconnects on its own after a lost connection.
    pub async fn connect(url: &str, stream: impl Into<String>) -> Result<Self, NatsError> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(|e| NatsError::Connect {
                url: outbox_core::secret::redact_url(url),
                source: Box::new(e),
            })?;
        Ok(Self::new(client, stream))
    }

    /// The subject template (default `events.{aggregatetype}.{type}`).
    #[must_use]
    pub fn subject(mut self, template: SubjectTemplate) -> Self {
        self.subject = template;
        self
    }

    /// The CloudEvent `source` (default [`DEFAULT_SOURCE`]).
    #[must_use]
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// Whether [`check`](Self::check) creates the stream when it is missing
    /// (default: yes).
    #[must_use]
    pub fn create_stream(mut self, create: bool) -> Self {
        self.create_stream = create;
        self
    }

    /// The configuration a missing stream is created with (retention,
    /// storage, limits). Its name is the publisher's stream; empty subjects
    /// become the template's wildcard.
    #[must_use]
    pub fn stream_config(mut self, config: stream::Config) -> Self {
        self.stream_config = Some(config);
        self
    }

    /// Refuses messages above this size, headers included, even when the
    /// server would take them (the server's `max_payload` always applies).
    #[must_use]
    pub fn max_entry_bytes(mut self, max: usize) -> Self {
        self.max_entry_bytes = Some(max);
        self
    }

    /// Events a call takes (default [`DEFAULT_MAX_BATCH_SIZE`], at least 1).
    #[must_use]
    pub fn max_batch_size(mut self, max: usize) -> Self {
        self.max_batch_size = max.max(1);
        self
    }

    /// How long each publish ack is awaited (default [`DEFAULT_ACK_TIMEOUT`]).
    #[must_use]
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self.js = context(&self.client, timeout);
        self
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn stream_name(&self) -> &str {
        &self.stream
    }

    pub fn subject_template(&self) -> &SubjectTemplate {
        &self.subject
    }

    /// The largest message sent: the server's `max_payload` (from the
    /// server's INFO, 1 MiB by default), or the configured limit if smaller.
    pub fn max_message_bytes(&self) -> usize {
        let server = self.client.server_info().max_payload;
        self.max_entry_bytes.map_or(server, |own| own.min(server))
    }

    /// Checks at start-up that the stream exists and takes every subject of
    /// the template, creating it when missing (unless told not to), so a typo
    /// fails the start instead of pausing the relay forever.
    pub async fn check(&self) -> Result<(), NatsError> {
        let wanted = self.subject.wildcard();
        match self.js.get_stream(&self.stream).await {
            Ok(found) => {
                let config = &found.cached_info().config;
                // A stream made without subjects takes its own name.
                let subjects = if config.subjects.is_empty() {
                    vec![config.name.clone()]
                } else {
                    config.subjects.clone()
                };
                if subjects.iter().any(|filter| covers(filter, &wanted)) {
                    Ok(())
                } else {
                    Err(NatsError::StreamMismatch {
                        stream: self.stream.clone(),
                        subjects,
                        wanted,
                    })
                }
            }
            Err(err) => match err.kind() {
                GetStreamErrorKind::JetStream(e)
                    if e.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    if self.create_stream {
                        self.create(wanted).await
                    } else {
                        Err(NatsError::StreamMissing {
                            stream: self.stream.clone(),
                        })
                    }
                }
                GetStreamErrorKind::EmptyName | GetStreamErrorKind::InvalidStreamName => Err(
                    NatsError::Config(format!("`{}` is not a valid stream name", self.stream)),
                ),
                _ => Err(NatsError::JetStream {
                    operation: "stream info",
                    retryable: true,
                    source: Box::new(err),
                }),
            },
        }
    }

    async fn create(&self, wanted: String) -> Result<(), NatsError> {
        let mut config = self.stream_config.clone().unwrap_or_default();
        config.name = self.stream.clone();
        if config.subjects.is_empty() {
            config.subjects = vec![wanted];
        }
        match self.js.create_stream(config).await {
            Ok(_) => Ok(()),
            Err(err) => {
                let (retryable, hint) = match err.kind() {
                    CreateStreamErrorKind::JetStream(e)
                        if e.error_code() == ErrorCode::STREAM_SUBJECT_OVERLAP =>
                    {
                        (false, " (another stream already takes these subjects)")
                    }
                    CreateStreamErrorKind::JetStream(_)
                    | CreateStreamErrorKind::EmptyStreamName
                    | CreateStreamErrorKind::InvalidStreamName
                    | CreateStreamErrorKind::DomainAndExternalSet => (false, ""),
                    _ => (true, ""),
                };
                Err(NatsError::JetStream {
                    operation: "create stream",
                    retryable,
                    source: format!("`{}`: {err}{hint}", self.stream).into(),
                })
            }
        }
    }

    /// The headers of `event`'s message.
    pub fn headers(&self, event: &Event) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            (MSG_ID_HEADER, event.id.to_string()),
            (EXPECTED_STREAM_HEADER, self.stream.clone()),
            (CONTENT_TYPE_HEADER, STRUCTURED_CONTENT_TYPE.to_owned()),
        ];
        if let Some(tp) = &event.metadata.traceparent {
            headers.push((TRACEPARENT_HEADER, tp.clone()));
        }
        headers
    }
}

/// Size of a message as the server counts it against `max_payload`: the
/// header block (`NATS/1.0\r\n`, `Name: value\r\n` each, `\r\n`) plus the body.
pub fn message_size(headers: &[(&str, String)], body: &str) -> usize {
    let block: usize = headers
        .iter()
        .map(|(name, value)| name.len() + ": ".len() + value.len() + "\r\n".len())
        .sum();
    HEADER_BLOCK_OVERHEAD + block + body.len()
}

/// Maps a publish or ack failure: the server or the connection failing is
/// the target's; a refusal of the one message is the entry's, for good.
fn publish_error(err: jetstream::context::PublishError) -> PublishError {
    let message = format!("NATS JetStream publish: {err}");
    match err.kind() {
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::MaxAckPending
        // No responders: no stream listens (JetStream down, stream deleted).
        | PublishErrorKind::StreamNotFound => PublishError::unavailable(message),
        PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence
        | PublishErrorKind::MaxPayloadExceeded => PublishError::permanent(message),
        _ => {
            let api = std::error::Error::source(&err)
                .and_then(|s| s.downcast_ref::<jetstream::Error>());
            match api {
                Some(api) => api_error(api, message),
                None => PublishError::unavailable(message),
            }
        }
        .with_source(err),
    }
}

/// A JetStream API error in a publish ack.
fn api_error(api: &jetstream::Error, message: String) -> PublishError {
    let code = api.error_code();
    let refused = [
        ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM,
        ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM,
        ErrorCode::STREAM_NOT_MATCH,
        ErrorCode::STREAM_WRONG_LAST_SEQUENCE,
        ErrorCode::STREAM_WRONG_LAST_MESSAGE_ID,
        ErrorCode::STREAM_DUPLICATE_MESSAGE_CONFLICT,
    ];
    if refused.contains(&code) {
        PublishError::permanent(message)
    } else if (400..500).contains(&api.code()) && code != ErrorCode::STREAM_STORE_FAILED {
        // Any other refusal of the request itself (400s) is the message's.
        PublishError::permanent(message)
    } else {
        // Storage failures, a full stream, a leader election: the stream's.
        PublishError::unavailable(message)
    }
}

impl Publisher for NatsPublisher {
    fn max_batch_size(&self) -> usize {
        self.max_batch_size
    }

    async fn publish(&self, request: PublishRequest<'_>) -> Vec<PublishResult> {
        let events = request.events;
        if events.is_empty() {
            return Vec::new();
        }
        // While disconnected the client would queue the messages and the
        // acks would time out one by one: answer at once instead.
        if self.client.connection_state() != State::Connected {
            return fail_all(
                &request,
                PublishError::unavailable("NATS: not connected to the server"),
            );
        }
        let max = self.max_message_bytes();
        let mut results: Vec<Option<PublishResult>> = vec![None; events.len()];
        let mut in_flight = Vec::with_capacity(events.len());
        let mut outage: Option<PublishError> = None;
        for (i, event) in events.iter().enumerate() {
            if let Some(err) = &outage {
                results[i] = Some(Err(err.clone()));
                continue;
            }
            let body = cloudevents::to_json(event, &self.source);
            let headers = self.headers(event);
            let size = message_size(&headers, &body);
            if size > max {
                results[i] = Some(Err(PublishError::permanent(format!(
                    "event {} is {size} bytes as a NATS message (headers included), above the \
                     limit of {max} bytes (the server's max_payload or the publisher's own limit)",
                    event.id
                ))));
                continue;
            }
            let mut map = HeaderMap::new();
            for (name, value) in headers {
                map.insert(name, value.as_str());
            }
            let message = PublishMessage::build()
                .payload(body.into_bytes().into())
                .headers(map);
            match self
                .js
                .send_publish(self.subject.render(event), message)
                .await
            {
                Ok(ack) => in_flight.push((i, ack)),
                Err(err) => {
                    let err = publish_error(err);
                    if err.is_target_failure() {
                        outage = Some(err.clone());
                    }
                    results[i] = Some(Err(err));
                }
            }
        }
        let acks = futures_util::future::join_all(
            in_flight
                .into_iter()
                .map(|(i, ack)| async move { (i, ack.await) }),
        )
        .await;
        for (i, ack) in acks {
            // A duplicate ack means the stream already has the event: done.
            results[i] = Some(ack.map(|_| ()).map_err(publish_error));
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(PublishError::unavailable("NATS: no result"))))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_counts_the_header_block() {
        let headers = vec![(MSG_ID_HEADER, "abc".to_owned())];
        // NATS/1.0\r\n + Nats-Msg-Id: abc\r\n + \r\n + body
        assert_eq!(message_size(&headers, "{}"), 10 + 18 + 2 + 2);
    }
}
