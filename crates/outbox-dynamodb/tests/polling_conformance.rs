//! The polling shape against the store conformance suite, on DynamoDB Local.

use aws_sdk_dynamodb::types::{AttributeValue, Put};
use aws_sdk_dynamodb::Client;
use outbox_core::{Event, EventId, Inbox, Seen, StoreError};
use outbox_dynamodb::{DynamoInbox, DynamoOutbox, PollingOutbox, Shape};
use outbox_testkit::{StoreFeatures, StoreHarness};

struct Dynamo {
    client: Client,
    outbox: DynamoOutbox,
    orders: String,
    inbox: DynamoInbox,
}

impl Dynamo {
    async fn new() -> Self {
        outbox_aws::testing::require_local_endpoints(&["DYNAMODB"]);
        let client = Client::new(&outbox_aws::load_config().await);
        let outbox = DynamoOutbox::new(client.clone(), outbox_aws::testing::unique_name("outbox"))
            .shape(Shape::Polling);
        outbox
            .create_table_if_missing()
            .await
            .expect("outbox table");
        let orders = outbox_aws::testing::unique_name("orders");
        DynamoOutbox::new(client.clone(), &orders)
            .create_table_if_missing()
            .await
            .expect("business table");
        let inbox = DynamoInbox::new(client.clone(), outbox_aws::testing::unique_name("inbox"));
        inbox.create_table_if_missing().await.expect("inbox table");
        Self {
            client,
            outbox,
            orders,
            inbox,
        }
    }
}

impl StoreHarness for Dynamo {
    type Store = PollingOutbox;

    fn store(&self) -> PollingOutbox {
        PollingOutbox::new(self.outbox.clone()).expect("polling shape")
    }

    async fn write(&self, key: &str, events: &[Event], commit: bool) -> Result<(), StoreError> {
        let order = Put::builder()
            .table_name(&self.orders)
            .item("pk", AttributeValue::S(key.to_owned()))
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .expect("put");
        let tx = self
            .outbox
            .transaction()
            .put(order)
            .events(events.iter().cloned());
        if commit {
            tx.commit().await.map_err(StoreError::from)
        } else {
            // Not committing is DynamoDB's rollback: nothing was sent.
            tx.build().map(drop).map_err(StoreError::from)
        }
    }

    async fn business_row_exists(&self, key: &str) -> Result<bool, StoreError> {
        let found = self
            .client
            .get_item()
            .table_name(&self.orders)
            .key("pk", AttributeValue::S(key.to_owned()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| outbox_aws::store_error("GetItem", e))?;
        Ok(found.item().is_some())
    }

    async fn inbox_record(
        &self,
        consumer: &str,
        id: EventId,
        commit: bool,
    ) -> Result<Seen, StoreError> {
        let mut tx = self.inbox.transaction();
        let seen = self.inbox.record(&mut tx, consumer, id).await?;
        if commit {
            tx.commit().await?;
        }
        Ok(seen)
    }
}

outbox_testkit::store_conformance!(Dynamo::new, StoreFeatures::all());

/// The table as documented: idempotent creation, TTL on `expires_at`, set
/// when an event is published.
#[tokio::test]
async fn polling_table_has_ttl_and_published_items_expire() {
    use outbox_core::{ClaimRequest, ClaimSource, Settlements};
    use std::time::Duration;

    let h = Dynamo::new().await;
    h.outbox
        .create_table_if_missing()
        .await
        .expect("a second create is a no-op");
    let ttl = h
        .client
        .describe_time_to_live()
        .table_name(h.outbox.table())
        .send()
        .await
        .expect("describe ttl");
    let ttl = ttl.time_to_live_description().expect("ttl description");
    assert_eq!(ttl.attribute_name(), Some("expires_at"));

    h.write(
        "o-1",
        &[outbox_testkit::order_event("o-1", 1, "OrderCreated")],
        true,
    )
    .await
    .expect("write");
    let store = h.store().retention(Duration::from_secs(3600));
    let claimed = store
        .claim(ClaimRequest::new(10, Duration::from_secs(5)))
        .await
        .expect("claim");
    let mut published = Settlements::default();
    published.published = claimed.events.iter().map(|c| c.receipt.clone()).collect();
    assert_eq!(
        store
            .settle(claimed.lease, published)
            .await
            .expect("settle"),
        1
    );
    let item = h
        .client
        .get_item()
        .table_name(h.outbox.table())
        .key("pk", AttributeValue::S("Order#o-1".into()))
        .key("sk", AttributeValue::N("1".into()))
        .consistent_read(true)
        .send()
        .await
        .expect("get")
        .item
        .expect("item");
    let expires: i64 = match item.get("expires_at") {
        Some(AttributeValue::N(n)) => n.parse().expect("number"),
        other => panic!("no expires_at: {other:?}"),
    };
    let in_an_hour = chrono::Utc::now().timestamp() + 3600;
    assert!(
        (in_an_hour - 5..=in_an_hour).contains(&expires),
        "{expires}"
    );
    assert!(
        !item.contains_key("pending_key"),
        "published items leave the pending index"
    );
}
