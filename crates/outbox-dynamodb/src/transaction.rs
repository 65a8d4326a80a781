//! One `TransactWriteItems`: the caller's own writes, its events, and its
//! inbox records, committed together or not at all.
//!
//! The outbox actions depend on the shape:
//!
//! - stream: ONE `Update` per aggregate of its outbox item (see
//!   [`crate::item`]), setting this transaction's events, on the condition
//!   that the item does not exist or is at the expected version (first new
//!   version − 1); for an expected version of 0 it must not exist;
//! - polling: one `Update` of the aggregate's head item with the same
//!   condition, plus one conditional `Put` per event (see [`crate::polling`]).
//!
//! [`Transaction::build`] checks every event and DynamoDB's limits before any
//! network call.

use std::collections::HashMap;

use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeValue, ConditionCheck, Delete, Put, TransactWriteItem, Update,
};
use aws_sdk_dynamodb::Client;
use outbox_core::{Event, EventId, InvalidEvent};

use crate::attr::{n, s};
use crate::error::TransactError;
use crate::item::{
    self, aggregate_key, AGGREGATE_ID, AGGREGATE_TYPE, COMMITTED_AT, EVENTS, PK, VERSION,
};
use crate::limits::{action_size, item_size, Limits};
use crate::outbox::{DynamoOutbox, Shape};
use crate::polling;

/// What an action of the transaction stands for, to explain a cancellation.
#[derive(Debug, Clone)]
enum Role {
    Entity,
    Inbox {
        consumer: String,
        event_id: EventId,
    },
    Outbox {
        aggregate_type: String,
        aggregate_id: String,
        expected: u64,
    },
}

/// A write transaction under construction: the caller's own actions, its
/// events, and inbox records. Builder methods take and return `self`;
/// the `push_*` twins take `&mut self` for loops.
#[derive(Debug, Clone)]
#[must_use = "a transaction does nothing until committed"]
pub struct Transaction {
    client: Client,
    outbox: Option<DynamoOutbox>,
    limits: Limits,
    actions: Vec<(TransactWriteItem, Role)>,
    events: Vec<Event>,
    token: Option<String>,
}

/// One aggregate's events in this transaction.
struct Group {
    aggregate_type: String,
    aggregate_id: String,
    key: String,
    events: Vec<Event>,
}

impl Transaction {
    /// A transaction with no outbox: for a consumer that records its inbox
    /// beside its own writes and emits no events. Adding events to it is an
    /// error at `build`.
    pub fn new(client: Client) -> Self {
        Self {
            client,
            outbox: None,
            limits: Limits::default(),
            actions: Vec::new(),
            events: Vec::new(),
            token: None,
        }
    }

    pub(crate) fn for_outbox(outbox: DynamoOutbox) -> Self {
        Self {
            client: outbox.client().clone(),
            limits: outbox.limits_in_use(),
            outbox: Some(outbox),
            actions: Vec::new(),
            events: Vec::new(),
            token: None,
        }
    }

    /// Overrides the limits checked by `build`.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    pub fn put(mut self, put: Put) -> Self {
        self.push_put(put);
        self
    }

    pub fn update(mut self, update: Update) -> Self {
        self.push_update(update);
        self
    }

    pub fn delete(mut self, delete: Delete) -> Self {
        self.push_delete(delete);
        self
    }

    pub fn condition_check(mut self, check: ConditionCheck) -> Self {
        self.push_condition_check(check);
        self
    }

    /// Any action of the caller's, as is.
    pub fn item(mut self, item: TransactWriteItem) -> Self {
        self.push_item(item);
        self
    }

    /// Events of any number of aggregates; per aggregate, versions must
    /// increase, and the first one minus one is the version the aggregate's
    /// outbox item must be at if it exists (0: it must not exist yet).
    pub fn events(mut self, events: impl IntoIterator<Item = Event>) -> Self {
        self.push_events(events);
        self
    }

    /// Makes the request idempotent for 10 minutes (DynamoDB's
    /// `ClientRequestToken`): a retry after a lost answer does not write twice.
    pub fn client_request_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    pub fn push_put(&mut self, put: Put) -> &mut Self {
        self.push_item(TransactWriteItem::builder().put(put).build())
    }

    pub fn push_update(&mut self, update: Update) -> &mut Self {
        self.push_item(TransactWriteItem::builder().update(update).build())
    }

    pub fn push_delete(&mut self, delete: Delete) -> &mut Self {
        self.push_item(TransactWriteItem::builder().delete(delete).build())
    }

    pub fn push_condition_check(&mut self, check: ConditionCheck) -> &mut Self {
        self.push_item(TransactWriteItem::builder().condition_check(check).build())
    }

    pub fn push_item(&mut self, item: TransactWriteItem) -> &mut Self {
        self.actions.push((item, Role::Entity));
        self
    }

    pub fn push_events(&mut self, events: impl IntoIterator<Item = Event>) -> &mut Self {
        self.events.extend(events);
        self
    }

    pub(crate) fn push_inbox(&mut self, put: Put, consumer: &str, event_id: EventId) {
        self.actions.push((
            TransactWriteItem::builder().put(put).build(),
            Role::Inbox {
                consumer: consumer.to_owned(),
                event_id,
            },
        ));
    }

    /// The caller's and inbox actions so far (outbox actions are added by `build`).
    pub fn len(&self) -> usize {
        self.actions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.actions.is_empty() && self.events.is_empty()
    }

    /// The actions to send, checked against the limits; no network call.
    /// The caller's actions come first, in the order given, then the outbox's.
    pub fn build(mut self) -> Result<Vec<TransactWriteItem>, TransactError> {
        self.prepare().map(|(items, _)| items)
    }

    /// Builds and sends the transaction.
    pub async fn commit(mut self) -> Result<(), TransactError> {
        let (items, roles) = self.prepare()?;
        if items.is_empty() {
            return Ok(());
        }
        let result = self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .set_client_request_token(self.token.take())
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(err) => Err(commit_error(err, &roles)),
        }
    }

    fn prepare(&mut self) -> Result<(Vec<TransactWriteItem>, Vec<Role>), TransactError> {
        let groups = group(std::mem::take(&mut self.events))?;
        let mut actions = std::mem::take(&mut self.actions);
        if !groups.is_empty() {
            let Some(outbox) = &self.outbox else {
                return Err(InvalidEvent::new(
                    "events",
                    "this transaction has no outbox table: start it with DynamoOutbox::transaction",
                )
                .into());
            };
            let committed_at = chrono::Utc::now().timestamp_millis();
            match outbox.shape_kind() {
                Shape::Stream => {
                    for g in &groups {
                        actions.push(stream_update(
                            outbox.table(),
                            g,
                            committed_at,
                            &self.limits,
                        )?);
                    }
                }
                Shape::Polling => {
                    let mut position = 0;
                    for g in &groups {
                        actions.push(head_update(outbox.table(), g)?);
                        for event in &g.events {
                            actions.push(polling_put(
                                outbox.table(),
                                g,
                                event,
                                committed_at,
                                position,
                                &self.limits,
                            )?);
                            position += 1;
                        }
                    }
                }
            }
        }
        check_limits(&actions, &self.limits)?;
        Ok(actions.into_iter().unzip())
    }
}

/// Validates the events and gathers them per aggregate, in first-seen order.
fn group(events: Vec<Event>) -> Result<Vec<Group>, TransactError> {
    let mut groups: Vec<Group> = Vec::new();
    let mut index: HashMap<(String, String), usize> = HashMap::new();
    for event in events {
        event.validate()?;
        let slot = match index.get(&(event.aggregate_type.clone(), event.aggregate_id.clone())) {
            Some(&i) => i,
            None => {
                let key = aggregate_key(&event.aggregate_type, &event.aggregate_id)?;
                index.insert(
                    (event.aggregate_type.clone(), event.aggregate_id.clone()),
                    groups.len(),
                );
                groups.push(Group {
                    aggregate_type: event.aggregate_type.clone(),
                    aggregate_id: event.aggregate_id.clone(),
                    key,
                    events: Vec::new(),
                });
                groups.len() - 1
            }
        };
        let g = &mut groups[slot];
        if let Some(last) = g.events.last() {
            if event.aggregate_version <= last.aggregate_version {
                return Err(TransactError::VersionOrder {
                    aggregate_type: g.aggregate_type.clone(),
                    aggregate_id: g.aggregate_id.clone(),
                    version: event.aggregate_version,
                    after: last.aggregate_version,
                });
            }
        }
        g.events.push(event);
    }
    Ok(groups)
}

impl Group {
    fn expected(&self) -> u64 {
        self.events
            .first()
            .map(|e| e.aggregate_version - 1)
            .unwrap_or(0)
    }

    fn last_version(&self) -> u64 {
        self.events.last().map(|e| e.aggregate_version).unwrap_or(0)
    }

    fn role(&self) -> Role {
        Role::Outbox {
            aggregate_type: self.aggregate_type.clone(),
            aggregate_id: self.aggregate_id.clone(),
            expected: self.expected(),
        }
    }

    /// The optimistic lock on the aggregate's version.
    fn condition(&self) -> &'static str {
        if self.expected() == 0 {
            "attribute_not_exists(#pk)"
        } else {
            "attribute_not_exists(#pk) OR #v = :prev"
        }
    }
}

fn internal(e: aws_smithy_types::error::operation::BuildError) -> TransactError {
    TransactError::Backend(Box::new(e))
}

fn too_big(limit: &'static str, actual: usize, max: usize) -> TransactError {
    TransactError::LimitExceeded {
        limit,
        actual: actual as u64,
        max: max as u64,
    }
}

/// Sets the outbox item of one aggregate to this transaction's events.
fn stream_update(
    table: &str,
    g: &Group,
    committed_at: i64,
    limits: &Limits,
) -> Result<(TransactWriteItem, Role), TransactError> {
    let mut values = item::item_values(&g.events, committed_at)?;
    let key = HashMap::from([(PK.to_owned(), s(&g.key))]);
    let size = item_size(&key) + item_size(&values);
    if size > limits.max_item_bytes {
        return Err(too_big("item bytes", size, limits.max_item_bytes));
    }
    let mut take = |name: &str| values.remove(name).unwrap_or(AttributeValue::Null(true));
    let mut expression_values = HashMap::from([
        (":t".to_owned(), take(AGGREGATE_TYPE)),
        (":i".to_owned(), take(AGGREGATE_ID)),
        (":v".to_owned(), take(VERSION)),
        (":e".to_owned(), take(EVENTS)),
        (":c".to_owned(), take(COMMITTED_AT)),
    ]);
    if g.expected() > 0 {
        expression_values.insert(":prev".to_owned(), n(g.expected()));
    }
    let update = Update::builder()
        .table_name(table)
        .set_key(Some(key))
        .update_expression("SET #t = :t, #i = :i, #v = :v, #e = :e, #c = :c")
        .condition_expression(g.condition())
        .set_expression_attribute_names(Some(HashMap::from([
            ("#pk".to_owned(), PK.to_owned()),
            ("#t".to_owned(), AGGREGATE_TYPE.to_owned()),
            ("#i".to_owned(), AGGREGATE_ID.to_owned()),
            ("#v".to_owned(), VERSION.to_owned()),
            ("#e".to_owned(), EVENTS.to_owned()),
            ("#c".to_owned(), COMMITTED_AT.to_owned()),
        ])))
        .set_expression_attribute_values(Some(expression_values))
        .build()
        .map_err(internal)?;
    Ok((
        TransactWriteItem::builder().update(update).build(),
        g.role(),
    ))
}

/// Moves the polling shape's head item of one aggregate to its new version.
fn head_update(table: &str, g: &Group) -> Result<(TransactWriteItem, Role), TransactError> {
    let mut values = HashMap::from([
        (":t".to_owned(), s(&g.aggregate_type)),
        (":i".to_owned(), s(&g.aggregate_id)),
        (":v".to_owned(), n(g.last_version())),
    ]);
    if g.expected() > 0 {
        values.insert(":prev".to_owned(), n(g.expected()));
    }
    let update = Update::builder()
        .table_name(table)
        .key(PK, s(&g.key))
        .key(polling::SK, n(polling::HEAD_SK))
        .update_expression("SET #t = :t, #i = :i, #v = :v")
        .condition_expression(g.condition())
        .set_expression_attribute_names(Some(HashMap::from([
            ("#pk".to_owned(), PK.to_owned()),
            ("#t".to_owned(), AGGREGATE_TYPE.to_owned()),
            ("#i".to_owned(), AGGREGATE_ID.to_owned()),
            ("#v".to_owned(), VERSION.to_owned()),
        ])))
        .set_expression_attribute_values(Some(values))
        .build()
        .map_err(internal)?;
    Ok((
        TransactWriteItem::builder().update(update).build(),
        g.role(),
    ))
}

/// One pending event item of the polling shape.
fn polling_put(
    table: &str,
    g: &Group,
    event: &Event,
    committed_at: i64,
    index: i64,
    limits: &Limits,
) -> Result<(TransactWriteItem, Role), TransactError> {
    use polling::*;
    let position = committed_at
        .saturating_mul(POSITION_SCALE)
        .saturating_add(index.min(POSITION_SCALE - 1));
    let item = HashMap::from([
        (PK.to_owned(), s(&g.key)),
        (SK.to_owned(), n(event.aggregate_version)),
        (EVENT.to_owned(), s(item::encode_event(event)?)),
        (EVENT_ID.to_owned(), s(event.id.to_string())),
        (STATUS.to_owned(), s(PENDING)),
        (POSITION.to_owned(), n(position)),
        (CREATED_AT.to_owned(), n(committed_at)),
        (ATTEMPTS.to_owned(), n(0)),
        (NEXT_ATTEMPT_AT.to_owned(), n(committed_at)),
        (PENDING_KEY.to_owned(), s(PENDING)),
    ]);
    let size = item_size(&item);
    if size > limits.max_item_bytes {
        return Err(too_big("item bytes", size, limits.max_item_bytes));
    }
    let put = Put::builder()
        .table_name(table)
        .set_item(Some(item))
        .condition_expression("attribute_not_exists(#pk)")
        .expression_attribute_names("#pk", PK)
        .build()
        .map_err(internal)?;
    Ok((TransactWriteItem::builder().put(put).build(), g.role()))
}

fn check_limits(
    actions: &[(TransactWriteItem, Role)],
    limits: &Limits,
) -> Result<(), TransactError> {
    if actions.len() > limits.max_actions {
        return Err(too_big(
            "transaction actions",
            actions.len(),
            limits.max_actions,
        ));
    }
    let mut total = 0usize;
    for (action, _) in actions {
        let size = action_size(action);
        // Only a Put states its whole item; the others' items are unknown here.
        if action.put().is_some() && size > limits.max_item_bytes {
            return Err(too_big("item bytes", size, limits.max_item_bytes));
        }
        total = total.saturating_add(size);
    }
    if total > limits.max_transaction_bytes {
        return Err(too_big(
            "transaction bytes",
            total,
            limits.max_transaction_bytes,
        ));
    }
    Ok(())
}

/// Cancellation reasons come one per action, in order: a failed condition
/// is explained by the role of the action it failed on.
fn commit_error(
    err: aws_smithy_runtime_api::client::result::SdkError<
        TransactWriteItemsError,
        aws_smithy_runtime_api::client::orchestrator::HttpResponse,
    >,
    roles: &[Role],
) -> TransactError {
    let Some(TransactWriteItemsError::TransactionCanceledException(canceled)) =
        err.as_service_error()
    else {
        return TransactError::sdk("TransactWriteItems", err);
    };
    let reasons = canceled.cancellation_reasons();
    if let Some((index, reason)) = reasons
        .iter()
        .enumerate()
        .find(|(_, r)| r.code() == Some("ConditionalCheckFailed"))
    {
        return match roles.get(index) {
            Some(Role::Outbox {
                aggregate_type,
                aggregate_id,
                expected,
            }) => TransactError::VersionConflict {
                aggregate_type: aggregate_type.clone(),
                aggregate_id: aggregate_id.clone(),
                expected: *expected,
            },
            Some(Role::Inbox { consumer, event_id }) => TransactError::InboxDuplicate {
                consumer: consumer.clone(),
                event_id: *event_id,
            },
            Some(Role::Entity) | None => TransactError::EntityCondition {
                index,
                message: reason
                    .message()
                    .unwrap_or("The conditional request failed")
                    .to_owned(),
            },
        };
    }
    let codes: Vec<&str> = reasons
        .iter()
        .filter_map(|r| r.code())
        .filter(|c| *c != "None")
        .collect();
    let message = format!(
        "TransactWriteItems canceled: {}",
        if codes.is_empty() {
            canceled.message().unwrap_or("no reason given").to_owned()
        } else {
            codes.join(", ")
        }
    );
    let retryable = codes.iter().any(|c| {
        matches!(
            *c,
            "TransactionConflict"
                | "ThrottlingError"
                | "ProvisionedThroughputExceeded"
                | "RequestLimitExceeded"
        )
    });
    if retryable {
        TransactError::Retryable(message.into())
    } else {
        TransactError::Backend(message.into())
    }
}
