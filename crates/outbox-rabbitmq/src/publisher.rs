//! Publishing to a RabbitMQ exchange with publisher confirms.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use outbox_core::cloudevents::{self, STRUCTURED_CONTENT_TYPE};
use outbox_core::publish::{fail_all, DEFAULT_SOURCE};
use outbox_core::{Event, PublishError, PublishRequest, PublishResult, Publisher};
use tokio::sync::Mutex;

use crate::error::RabbitError;
use crate::routing::RoutingKey;

/// Largest message body sent by default: 16 MiB. RabbitMQ refuses bodies
/// above its `max_message_size` by closing the channel; that limit is
/// 128 MiB by default up to RabbitMQ 3.13 and 16 MiB from 4.0 on, and a
/// client cannot read it. The smaller one is the default so every server
/// takes what is sent; raise it with
/// [`RabbitPublisher::max_message_bytes`] to match your server.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Events a call takes by default; all are in flight at once.
pub const DEFAULT_MAX_BATCH_SIZE: usize = 100;

/// How long a confirm is awaited (and a connection attempt) by default
/// before the broker counts as unavailable.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest AMQP short string (routing keys, `message_id`, `type`): 255 bytes.
pub const MAX_SHORT_STRING_BYTES: usize = 255;

/// Bytes of a frame that are not content: type, channel, size, end marker.
const FRAME_OVERHEAD: usize = 8;

/// Header frame fields before the properties: class, weight, body size,
/// property flags.
const CONTENT_HEADER_FIXED: usize = 2 + 2 + 8 + 2;

/// What a call needs from the live connection.
#[derive(Debug)]
struct Session {
    connection: Connection,
    channel: Channel,
}

impl Session {
    fn is_open(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }
}

/// Publishes events to a RabbitMQ exchange (topic, durable, declared when
/// missing), the CloudEvent JSON as the body.
///
/// Each message is persistent (delivery mode 2) with `message_id` = the event
/// id, `type` = the event type, and routing key = the event type (or a
/// template). It is published `mandatory`, so a message no queue takes comes
/// back as an error instead of vanishing. Every confirm is awaited: a call
/// sends all its messages, then awaits all their confirms.
///
/// A lost connection fails the call (the target's failure: the relay pauses
/// and probes); the next call connects again.
#[derive(Debug)]
pub struct RabbitPublisher {
    uri: String,
    exchange: ShortString,
    routing: RoutingKey,
    source: String,
    declare_exchange: bool,
    auto_delete: bool,
    max_message_bytes: usize,
    max_batch_size: usize,
    timeout: Duration,
    session: Mutex<Option<Session>>,
}

impl RabbitPublisher {
    /// A publisher for `exchange` on the broker at `uri`
    /// (`amqp://user:password@host:5672/vhost`); nothing is sent until
    /// [`check`](Self::check) or the first publish.
    pub fn new(uri: impl Into<String>, exchange: &str) -> Result<Self, RabbitError> {
        let exchange = ShortString::try_new(exchange)
            .map_err(|e| RabbitError::Config(format!("exchange name: {e}")))?;
        Ok(Self {
            uri: uri.into(),
            exchange,
            routing: RoutingKey::default(),
            source: DEFAULT_SOURCE.to_owned(),
            declare_exchange: true,
            auto_delete: false,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_batch_size: DEFAULT_MAX_BATCH_SIZE,
            timeout: DEFAULT_CONFIRM_TIMEOUT,
            session: Mutex::new(None),
        })
    }

    /// Connects to `uri` and declares `exchange`: a publisher ready to use.
    pub async fn connect(uri: impl Into<String>, exchange: &str) -> Result<Self, RabbitError> {
        let publisher = Self::new(uri, exchange)?;
        publisher.check().await?;
        Ok(publisher)
    }

    /// The routing key (default: the event type).
    #[must_use]
    pub fn routing_key(mut self, routing: RoutingKey) -> Self {
        self.routing = routing;
        self
    }

    /// The CloudEvent `source` (default [`DEFAULT_SOURCE`]).
    #[must_use]
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// Whether the exchange is declared on connecting (default: yes). Off,
    /// it must exist: connecting checks that it does.
    #[must_use]
    pub fn declare_exchange(mut self, declare: bool) -> Self {
        self.declare_exchange = declare;
        self
    }

    /// Declares the exchange auto-delete: gone once its last binding is.
    /// For tests and demos.
    #[must_use]
    pub fn exchange_auto_delete(mut self, auto_delete: bool) -> Self {
        self.auto_delete = auto_delete;
        self
    }

    /// Refuses bodies above this size (default [`DEFAULT_MAX_MESSAGE_BYTES`]);
    /// set it to the server's `max_message_size`.
    #[must_use]
    pub fn max_message_bytes(mut self, max: usize) -> Self {
        self.max_message_bytes = max;
        self
    }

    /// Events a call takes (default [`DEFAULT_MAX_BATCH_SIZE`], at least 1).
    #[must_use]
    pub fn max_batch_size(mut self, max: usize) -> Self {
        self.max_batch_size = max.max(1);
        self
    }

    /// How long a confirm, and a connection attempt, are awaited (default
    /// [`DEFAULT_CONFIRM_TIMEOUT`]).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn exchange(&self) -> &str {
        self.exchange.as_str()
    }

    /// Connects (if not connected) and declares the exchange: at start-up,
    /// so a wrong address, credentials or exchange type fail the start.
    pub async fn check(&self) -> Result<(), RabbitError> {
        self.channel().await.map(|_| ())
    }

    /// The open channel, connecting again first if the connection or the
    /// channel was lost.
    async fn channel(&self) -> Result<(Channel, usize), RabbitError> {
        let mut session = self.session.lock().await;
        if let Some(s) = session.as_ref().filter(|s| s.is_open()) {
            return Ok((s.channel.clone(), frame_max(&s.connection)));
        }
        if let Some(old) = session.take() {
            // Best effort: the old connection is usually dead already.
            let _ = old.connection.close(200, "reconnecting".into()).await;
        }
        let fresh = tokio::time::timeout(self.timeout, self.open())
            .await
            .map_err(|_| {
                RabbitError::Connect(format!("no connection within {:?}", self.timeout).into())
            })??;
        let out = (fresh.channel.clone(), frame_max(&fresh.connection));
        *session = Some(fresh);
        Ok(out)
    }

    async fn open(&self) -> Result<Session, RabbitError> {
        let connection = Connection::connect(&self.uri, ConnectionProperties::default())
            .await
            .map_err(|e| RabbitError::Connect(Box::new(e)))?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| RabbitError::amqp("channel.open", e))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| RabbitError::amqp("confirm.select", e))?;
        // Declared, or (when told not to declare) checked passively, so a
        // missing exchange fails the start instead of every publish.
        let options = ExchangeDeclareOptions {
            passive: !self.declare_exchange,
            durable: true,
            auto_delete: self.auto_delete,
            ..Default::default()
        };
        channel
            .exchange_declare(
                self.exchange.clone(),
                ExchangeKind::Topic,
                options,
                FieldTable::default(),
            )
            .await
            .map_err(|e| match RabbitError::amqp("exchange.declare", e) {
                RabbitError::Amqp {
                    source,
                    retryable: false,
                    ..
                } => RabbitError::Config(if self.declare_exchange {
                    format!(
                        "exchange `{}` cannot be declared as a durable topic exchange \
                         (does it exist with another type or settings?): {source}",
                        self.exchange
                    )
                } else {
                    format!("exchange `{}` does not exist: {source}", self.exchange)
                }),
                other => other,
            })?;
        Ok(Session {
            connection,
            channel,
        })
    }

    /// The routing key and properties of `event`'s message, or why it
    /// cannot be sent.
    pub fn message(&self, event: &Event) -> Result<(ShortString, BasicProperties), PublishError> {
        let short = |what: &str, value: String| {
            ShortString::try_new(value).map_err(|e| {
                PublishError::permanent(format!(
                    "event {}: the {what} is longer than AMQP's {MAX_SHORT_STRING_BYTES}-byte limit: {e}",
                    event.id
                ))
            })
        };
        let routing_key = short("routing key", self.routing.render(event))?;
        let mut properties = BasicProperties::default()
            .with_message_id(short("message id", event.id.to_string())?)
            .with_content_type(STRUCTURED_CONTENT_TYPE.into())
            .with_delivery_mode(2)
            .with_type(short("event type", event.event_type.clone())?)
            .with_timestamp(u64::try_from(event.occurred_at.timestamp()).unwrap_or(0));
        if let Ok(app_id) = ShortString::try_new(self.source.as_str()) {
            properties = properties.with_app_id(app_id);
        }
        if let Some(tp) = &event.metadata.traceparent {
            let mut headers = FieldTable::default();
            headers.insert(
                "traceparent".into(),
                AMQPValue::LongString(LongString::from(tp.as_str())),
            );
            properties = properties.with_headers(headers);
        }
        Ok((routing_key, properties))
    }

    async fn send(
        &self,
        channel: &Channel,
        routing_key: ShortString,
        body: Vec<u8>,
        properties: BasicProperties,
    ) -> PublishResult {
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let sent = async {
            let confirm = channel
                .basic_publish(
                    self.exchange.clone(),
                    routing_key.clone(),
                    options,
                    &body,
                    properties,
                )
                .await?;
            confirm.await
        };
        match tokio::time::timeout(self.timeout, sent).await {
            Err(_) => Err(PublishError::unavailable(format!(
                "RabbitMQ: no publisher confirm within {:?}",
                self.timeout
            ))),
            Ok(Err(err)) => {
                Err(PublishError::unavailable(format!("RabbitMQ publish: {err}")).with_source(err))
            }
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)))) => {
                Err(PublishError::permanent(format!(
                    "unroutable: exchange `{}` routes routing key `{routing_key}` to no queue \
                     ({} {})",
                    self.exchange, returned.reply_code, returned.reply_text
                )))
            }
            Ok(Ok(Confirmation::Nack(None))) => Err(PublishError::transient(
                "RabbitMQ refused the message (nack): it could not store it",
            )),
            Ok(Ok(Confirmation::NotRequested)) => Err(PublishError::unavailable(
                "RabbitMQ: the channel is not in confirm mode",
            )),
        }
    }
}

fn frame_max(connection: &Connection) -> usize {
    connection.configuration().frame_max() as usize
}

/// A generous estimate of the content header frame of a message with these
/// properties: it must fit in one frame of the negotiated `frame_max`.
fn header_frame_bytes(routing_key: &ShortString, properties: &BasicProperties) -> usize {
    let strings: usize = [
        properties.message_id(),
        properties.content_type(),
        properties.kind(),
        properties.app_id(),
    ]
    .into_iter()
    .flatten()
    .map(|s| 1 + s.as_str().len())
    .sum();
    let headers: usize = properties.headers().as_ref().map_or(0, |h| {
        h.inner()
            .iter()
            .map(|(k, v)| {
                1 + k.as_str().len()
                    + 1
                    + 4
                    + match v {
                        AMQPValue::LongString(s) => s.as_bytes().len(),
                        _ => 16,
                    }
            })
            .sum::<usize>()
            + 4
    });
    FRAME_OVERHEAD + CONTENT_HEADER_FIXED + strings + headers + 1 + 8 + routing_key.as_str().len()
}

impl Publisher for RabbitPublisher {
    fn max_batch_size(&self) -> usize {
        self.max_batch_size
    }

    async fn publish(&self, request: PublishRequest<'_>) -> Vec<PublishResult> {
        let events = request.events;
        if events.is_empty() {
            return Vec::new();
        }
        let (channel, frame_max) = match self.channel().await {
            Ok(found) => found,
            Err(err) => {
                let message = format!("RabbitMQ unavailable: {err}");
                return fail_all(
                    &request,
                    PublishError::unavailable(message).with_source(err),
                );
            }
        };
        let sends = events.iter().map(|event| {
            let channel = &channel;
            async move {
                let (routing_key, properties) = self.message(event)?;
                let body = cloudevents::to_json(event, &self.source).into_bytes();
                if body.len() > self.max_message_bytes {
                    return Err(PublishError::permanent(format!(
                        "event {} is {} bytes, above the RabbitMQ message size limit of {} bytes \
                         (max_message_size)",
                        event.id,
                        body.len(),
                        self.max_message_bytes
                    )));
                }
                let header = header_frame_bytes(&routing_key, &properties);
                if frame_max > 0 && header > frame_max {
                    return Err(PublishError::permanent(format!(
                        "event {}: its AMQP header frame ({header} bytes) exceeds the \
                         connection's frame_max of {frame_max} bytes",
                        event.id
                    )));
                }
                self.send(channel, routing_key, body, properties).await
            }
        });
        // Polled in order, each publish is queued on the channel before the
        // next: all are in flight, then all confirms are awaited.
        futures_util::future::join_all(sends).await
    }
}
