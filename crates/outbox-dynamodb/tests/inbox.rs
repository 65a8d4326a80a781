//! The inbox inside the consumer's own `TransactWriteItems`, on DynamoDB Local.

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;
use outbox_core::{EventId, Inbox, Seen, StoreError};
use outbox_dynamodb::{DynamoInbox, DynamoOutbox, TransactError, Transaction};

struct Consumer {
    client: Client,
    inbox: DynamoInbox,
    shipments: String,
}

async fn consumer() -> Consumer {
    outbox_aws::testing::require_local_endpoints(&["DYNAMODB"]);
    let client = Client::new(&outbox_aws::load_config().await);
    let inbox = DynamoInbox::new(client.clone(), outbox_aws::testing::unique_name("inbox"));
    inbox.create_table_if_missing().await.expect("inbox table");
    let shipments = outbox_aws::testing::unique_name("shipments");
    DynamoOutbox::new(client.clone(), &shipments)
        .create_table_if_missing()
        .await
        .expect("shipments table");
    Consumer {
        client,
        inbox,
        shipments,
    }
}

impl Consumer {
    /// The consumer's own change for an event: one shipment item, counting
    /// how many times it was applied.
    fn ship(&self, tx: &mut Transaction, event: EventId) {
        tx.push_update(
            aws_sdk_dynamodb::types::Update::builder()
                .table_name(&self.shipments)
                .key("pk", AttributeValue::S(event.to_string()))
                .update_expression("ADD applied :one")
                .expression_attribute_values(":one", AttributeValue::N("1".into()))
                .build()
                .expect("update"),
        );
    }

    /// Handles one delivery the way a consumer does: record, apply if first, commit.
    async fn handle(&self, event: EventId) -> Result<Seen, TransactError> {
        let mut tx = self.inbox.transaction();
        let seen = self
            .inbox
            .record(&mut tx, "shipping", event)
            .await
            .expect("record");
        if seen == Seen::First {
            self.ship(&mut tx, event);
            tx.commit().await?;
        }
        Ok(seen)
    }

    async fn applied(&self, event: EventId) -> u32 {
        let item = self
            .client
            .get_item()
            .table_name(&self.shipments)
            .key("pk", AttributeValue::S(event.to_string()))
            .consistent_read(true)
            .send()
            .await
            .expect("get")
            .item;
        match item.as_ref().and_then(|i| i.get("applied")) {
            Some(AttributeValue::N(n)) => n.parse().expect("number"),
            _ => 0,
        }
    }
}

#[tokio::test]
async fn first_is_applied_and_duplicate_is_skipped() {
    let c = consumer().await;
    let event = EventId::new();
    assert_eq!(c.handle(event).await.expect("first"), Seen::First);
    assert_eq!(c.handle(event).await.expect("again"), Seen::Duplicate);
    assert_eq!(c.handle(event).await.expect("again"), Seen::Duplicate);
    assert_eq!(c.applied(event).await, 1, "applied exactly once");
    assert!(c.inbox.contains("shipping", event).await.expect("read"));
    assert!(
        !c.inbox.contains("billing", event).await.expect("read"),
        "consumers are independent"
    );
}

#[tokio::test]
async fn a_transaction_not_committed_records_nothing() {
    let c = consumer().await;
    let event = EventId::new();
    let mut tx = c.inbox.transaction();
    assert_eq!(
        c.inbox
            .record(&mut tx, "shipping", event)
            .await
            .expect("record"),
        Seen::First
    );
    c.ship(&mut tx, event);
    drop(tx); // the handler failed before committing
    assert!(!c.inbox.contains("shipping", event).await.expect("read"));
    assert_eq!(c.applied(event).await, 0);
    assert_eq!(c.handle(event).await.expect("redelivery"), Seen::First);
    assert_eq!(c.applied(event).await, 1);
}

#[tokio::test]
async fn a_race_is_reported_at_commit() {
    let c = consumer().await;
    let event = EventId::new();
    // Two deliveries of one event, handled at once: both see it as new.
    let (mut one, mut two) = (c.inbox.transaction(), c.inbox.transaction());
    c.ship(&mut one, event);
    c.ship(&mut two, event);
    for tx in [&mut one, &mut two] {
        assert_eq!(
            c.inbox.record(tx, "shipping", event).await.expect("record"),
            Seen::First
        );
    }
    one.commit().await.expect("first commit");
    let err = two.commit().await.expect_err("second commit");
    match &err {
        TransactError::InboxDuplicate { consumer, event_id } => {
            assert_eq!((consumer.as_str(), *event_id), ("shipping", event));
        }
        other => panic!("expected InboxDuplicate, got {other:?}"),
    }
    assert!(matches!(StoreError::from(err), StoreError::Conflict(_)));
    assert_eq!(
        c.applied(event).await,
        1,
        "the losing transaction applied nothing"
    );
}

#[tokio::test]
async fn inbox_and_new_events_share_one_transaction() {
    let c = consumer().await;
    let outbox = DynamoOutbox::new(c.client.clone(), outbox_aws::testing::unique_name("outbox"));
    outbox.create_table_if_missing().await.expect("outbox");
    let event = EventId::new();
    let mut tx = outbox.transaction();
    assert_eq!(
        c.inbox
            .record(&mut tx, "shipping", event)
            .await
            .expect("record"),
        Seen::First
    );
    c.ship(&mut tx, event);
    let shipped = outbox_testkit::order_event("s-1", 1, "ShipmentCreated");
    tx.events([shipped]).commit().await.expect("commit");
    assert!(c.inbox.contains("shipping", event).await.expect("read"));
    // The same input again: the outbox write would conflict too, but the
    // inbox answers first, before any transaction.
    let mut tx = outbox.transaction();
    assert_eq!(
        c.inbox
            .record(&mut tx, "shipping", event)
            .await
            .expect("record"),
        Seen::Duplicate
    );
    let item = c
        .client
        .get_item()
        .table_name(outbox.table())
        .key("pk", AttributeValue::S("Order#s-1".into()))
        .consistent_read(true)
        .send()
        .await
        .expect("get")
        .item;
    assert!(
        item.is_some(),
        "the consumer's own event was written with its inbox record"
    );
}

#[tokio::test]
async fn purge_removes_only_old_records_of_one_consumer() {
    let c = consumer().await;
    let (old, other) = (EventId::new(), EventId::new());
    c.handle(old).await.expect("old");
    let mut tx = c.inbox.transaction();
    c.inbox
        .record(&mut tx, "billing", other)
        .await
        .expect("record");
    tx.commit().await.expect("commit");
    let cutoff = chrono::Utc::now() + chrono::Duration::seconds(1);
    assert_eq!(
        c.inbox
            .purge_older_than("shipping", chrono::Utc::now() - chrono::Duration::hours(1))
            .await
            .expect("purge"),
        0
    );
    assert_eq!(
        c.inbox
            .purge_older_than("shipping", cutoff)
            .await
            .expect("purge"),
        1
    );
    assert!(!c.inbox.contains("shipping", old).await.expect("read"));
    assert!(c.inbox.contains("billing", other).await.expect("read"));
}
