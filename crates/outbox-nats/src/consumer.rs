//! The consumer side: apply each delivered event once, with the inbox in
//! the consumer's own transaction, and acknowledge only after that.

use std::future::Future;
use std::ops::DerefMut;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use outbox_core::cloudevents::Received;
use outbox_core::{BoxError, Inbox, Seen, StoreError};

use crate::error::NatsError;

/// How long a failed message waits before JetStream delivers it again.
pub const DEFAULT_NAK_DELAY: Duration = Duration::from_secs(1);

/// Applies delivered events once: the inbox records the event id in the
/// transaction the consumer's own change is made in.
///
/// For each message, [`handle`](Self::handle) parses the CloudEvent, begins
/// a transaction with `begin`, records the event in the inbox, and calls
/// `apply(tx, event, seen)`. `apply` makes its change when `seen` is
/// [`Seen::First`] and commits `tx` (on [`Seen::Duplicate`] it just returns;
/// dropping the transaction rolls it back). The message is acknowledged only
/// after `apply` succeeded; on failure it is delivered again later. A body
/// that is not an event is terminated: JetStream will not deliver it again.
///
/// ```no_run
/// # async fn run(outbox: outbox_sqlite::SqliteOutbox, msg: async_nats::jetstream::Message) -> Result<(), outbox_nats::NatsError> {
/// use outbox_core::Seen;
/// let consumer = outbox_nats::InboxConsumer::new("shipping", outbox_sqlite::SqliteInbox);
/// consumer
///     .handle(&msg, || outbox.begin(), |mut tx, received, seen| async move {
///         if seen == Seen::First {
///             sqlx::query("INSERT INTO shipments (order_id) VALUES (?)")
///                 .bind(&received.event.aggregate_id)
///                 .execute(&mut *tx)
///                 .await?;
///         }
///         tx.commit().await?;
///         Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
///     })
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct InboxConsumer<I> {
    name: String,
    inbox: I,
    nak_delay: Duration,
}

impl<I: Inbox> InboxConsumer<I> {
    /// A consumer named `name`: the inbox keeps its records under that name.
    pub fn new(name: impl Into<String>, inbox: I) -> Self {
        Self {
            name: name.into(),
            inbox,
            nak_delay: DEFAULT_NAK_DELAY,
        }
    }

    /// How long a failed message waits to be delivered again (default
    /// [`DEFAULT_NAK_DELAY`]).
    #[must_use]
    pub fn nak_delay(mut self, delay: Duration) -> Self {
        self.nak_delay = delay;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Applies one message body without acknowledging anything: parse,
    /// begin, record in the inbox, `apply`. For brokers' messages of any
    /// kind; [`handle`](Self::handle) adds JetStream's acknowledgements.
    pub async fn apply<Tx, B, BF, F, FF, E>(
        &self,
        body: &[u8],
        begin: B,
        apply: F,
    ) -> Result<Seen, NatsError>
    where
        B: FnOnce() -> BF,
        BF: Future<Output = Result<Tx, StoreError>>,
        Tx: DerefMut<Target = I::Connection>,
        F: FnOnce(Tx, Received, Seen) -> FF,
        FF: Future<Output = Result<(), E>>,
        E: Into<BoxError>,
    {
        outbox_core::inbox::apply_once(&self.inbox, &self.name, body, begin, apply)
            .await
            .map_err(Into::into)
    }

    /// Applies a JetStream message once (see the type's docs) and answers
    /// JetStream: ack after success, a delayed nak after a failure, term
    /// for a body that is not an event. The ack waits for the server's
    /// confirmation, so a lost ack is reported ([`NatsError::Ack`]); the
    /// message then comes again and the inbox skips it.
    pub async fn handle<Tx, B, BF, F, FF, E>(
        &self,
        message: &jetstream::Message,
        begin: B,
        apply: F,
    ) -> Result<Seen, NatsError>
    where
        B: FnOnce() -> BF,
        BF: Future<Output = Result<Tx, StoreError>>,
        Tx: DerefMut<Target = I::Connection>,
        F: FnOnce(Tx, Received, Seen) -> FF,
        FF: Future<Output = Result<(), E>>,
        E: Into<BoxError>,
    {
        match self.apply(&message.payload, begin, apply).await {
            Ok(seen) => {
                message.double_ack().await.map_err(NatsError::Ack)?;
                Ok(seen)
            }
            Err(err @ NatsError::Malformed(_)) => {
                tracing::warn!(consumer = %self.name, error = %err, "terminating a message that is not an event");
                message
                    .ack_with(AckKind::Term)
                    .await
                    .map_err(NatsError::Ack)?;
                Err(err)
            }
            Err(err) => {
                // Best effort: without the nak the message comes back after
                // the consumer's ack wait anyway.
                if let Err(nak) = message.ack_with(AckKind::Nak(Some(self.nak_delay))).await {
                    tracing::warn!(consumer = %self.name, error = %nak, "nak failed");
                }
                Err(err)
            }
        }
    }
}
