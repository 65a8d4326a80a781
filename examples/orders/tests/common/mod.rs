//! API cases every store must pass, through `orders::api::handle`.

#![allow(dead_code, clippy::unwrap_used)] // each test file uses a part; helpers fail loudly

use std::future::Future;
use std::sync::Arc;

use orders::api::{self, Request, Response};
use orders::domain::{Change, Meta};
use orders::store::OrderStore;
use outbox_core::{Event, StoreError};
use serde_json::{json, Value};

pub const VALID: &str =
    r#"{"customerId": "c-1", "items": [{"sku": "A1", "quantity": 2, "unitPriceCents": 1250}]}"#;

pub async fn call<S: OrderStore>(
    store: &S,
    method: &str,
    path: &str,
    body: &str,
    if_match: Option<&str>,
) -> Response {
    api::handle(
        store,
        Request {
            method,
            path,
            body: body.as_bytes(),
            if_match,
            ..Request::default()
        },
    )
    .await
}

pub async fn create<S: OrderStore>(store: &S) -> String {
    let r = call(store, "POST", "/orders", VALID, None).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    r.body["orderId"].as_str().unwrap().to_owned()
}

fn error_of(r: &Response) -> &str {
    r.body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message in {}", r.body))
}

/// Create, read, pay, cancel; the refusals of a paid and a cancelled order.
pub async fn lifecycle<S: OrderStore>(store: &S) {
    let r = call(store, "POST", "/orders", VALID, None).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["status"], "created");
    assert_eq!(r.body["version"], 1);
    assert_eq!(r.body["totalCents"], 2500);
    assert_eq!(r.body["customerId"], "c-1");
    let id = r.body["orderId"].as_str().unwrap().to_owned();
    assert!(r.headers.contains(&("location", format!("/orders/{id}"))));

    let r = call(store, "GET", &format!("/orders/{id}"), "", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["items"][0]["sku"], "A1");
    assert!(r.headers.contains(&("etag", "\"1\"".to_owned())));

    let r = call(store, "POST", &format!("/orders/{id}/pay"), "", None).await;
    assert_eq!(
        (r.status, &r.body["status"], &r.body["version"]),
        (200, &json!("paid"), &json!(2))
    );
    let r = call(store, "POST", &format!("/orders/{id}/pay"), "", None).await;
    assert_eq!(r.status, 409, "paying twice: {:?}", r.body);
    assert!(error_of(&r).contains("already paid"), "{:?}", r.body);

    let r = call(
        store,
        "POST",
        &format!("/orders/{id}/cancel"),
        r#"{"reason": "changed my mind"}"#,
        Some("2"),
    )
    .await;
    assert_eq!(
        (r.status, &r.body["status"], &r.body["version"]),
        (200, &json!("cancelled"), &json!(3))
    );
    let r = call(store, "POST", &format!("/orders/{id}/cancel"), "", None).await;
    assert_eq!(r.status, 409, "cancelling twice: {:?}", r.body);
    assert!(error_of(&r).contains("cancelled"), "{:?}", r.body);
    let r = call(store, "POST", &format!("/orders/{id}/pay"), "", None).await;
    assert_eq!(r.status, 409, "paying a cancelled order: {:?}", r.body);
}

/// Malformed and invalid orders: 400 with a message naming the problem,
/// and nothing written (`count` gives (orders, events) in the store).
pub async fn bad_input_writes_nothing<S, F, Fut>(store: &S, count: F)
where
    S: OrderStore,
    F: Fn() -> Fut,
    Fut: Future<Output = (u64, u64)>,
{
    let before = count().await;
    let cases: &[(&str, &str)] = &[
        ("", "body must be a JSON order"),
        ("{", "malformed order"),
        ("[]", "malformed order"),
        (r#"{"customerId": "c-1"}"#, "missing field `items`"),
        (r#"{"customerId": "c-1", "items": []}"#, "at least one item"),
        (
            r#"{"customerId": "", "items": [{"sku": "A", "quantity": 1, "unitPriceCents": 1}]}"#,
            "customerId",
        ),
        (
            r#"{"customerId": "c", "items": [{"sku": "A", "quantity": 0, "unitPriceCents": 1}]}"#,
            "quantity",
        ),
        (
            r#"{"customerId": "c", "items": [{"sku": "A", "quantity": -1, "unitPriceCents": 1}]}"#,
            "malformed order",
        ),
        (
            r#"{"customerId": "c", "items": [{"sku": "A", "quantity": 4000000000, "unitPriceCents": 1}]}"#,
            "quantity",
        ),
        (
            r#"{"customerId": "c", "items": [{"sku": "A", "quantity": 1e30, "unitPriceCents": 1}]}"#,
            "malformed order",
        ),
        (
            r#"{"customerId": "c", "items": [{"sku": "A", "quantity": 10000, "unitPriceCents": 18446744073709551615}]}"#,
            "too large",
        ),
        (
            r#"{"customerId": "c", "items": [{"sku": "A", "quantity": 10000, "unitPriceCents": 4611686018427387904}]}"#,
            "too large",
        ),
        (
            r#"{"customerId": "c", "items": [{"sku": "A", "quantity": 1, "unitPriceCents": 1}], "admin": true}"#,
            "unknown field",
        ),
        (
            r#"{"customerId": "c", "items": [{"sku": "A", "quantity": "2", "unitPriceCents": 1}]}"#,
            "malformed order",
        ),
    ];
    for (body, message) in cases {
        let r = call(store, "POST", "/orders", body, None).await;
        assert_eq!(r.status, 400, "{body}: {:?}", r.body);
        assert!(
            error_of(&r).contains(message),
            "{body}: the error {:?} should mention {message:?}",
            r.body
        );
    }
    let id = create(store).await;
    let path = format!("/orders/{id}/cancel");
    for (body, if_match) in [("{", None), (r#"{"why": "x"}"#, None), ("", Some("one"))] {
        let r = call(store, "POST", &path, body, if_match).await;
        assert_eq!(r.status, 400, "cancel {body:?} {if_match:?}: {:?}", r.body);
    }
    let r = call(store, "GET", &format!("/orders/{id}"), "", None).await;
    assert_eq!(
        r.body["status"], "created",
        "a refused cancel changed nothing"
    );
    let after = count().await;
    assert_eq!(
        after,
        (before.0 + 1, before.1 + 1),
        "only the one valid order and its event were written"
    );
}

/// Unknown orders, routes and methods.
pub async fn unknown_orders_and_routes<S: OrderStore>(store: &S) {
    for (method, path) in [
        ("GET", "/orders/no-such-order"),
        ("POST", "/orders/no-such-order/pay"),
        ("POST", "/orders/no-such-order/cancel"),
    ] {
        let r = call(store, method, path, "", None).await;
        assert_eq!(r.status, 404, "{method} {path}: {:?}", r.body);
        assert!(
            error_of(&r).contains("no order no-such-order"),
            "{:?}",
            r.body
        );
    }
    let long = format!("/orders/{}", "x".repeat(3000));
    assert_eq!(call(store, "GET", &long, "", None).await.status, 404);
    assert_eq!(call(store, "GET", "/customers", "", None).await.status, 404);
    assert_eq!(
        call(store, "DELETE", "/orders/x", "", None).await.status,
        405
    );
    assert_eq!(call(store, "GET", "/orders", "", None).await.status, 405);
}

/// `If-Match` with a stale version is a 409 and changes nothing.
pub async fn stale_if_match_is_a_conflict<S: OrderStore>(store: &S) {
    let id = create(store).await;
    let r = call(
        store,
        "POST",
        &format!("/orders/{id}/pay"),
        "",
        Some("\"1\""),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = call(
        store,
        "POST",
        &format!("/orders/{id}/cancel"),
        "",
        Some("1"),
    )
    .await;
    assert_eq!(r.status, 409, "{:?}", r.body);
    assert!(error_of(&r).contains("at version 2, not 1"), "{:?}", r.body);
    let r = call(store, "GET", &format!("/orders/{id}"), "", None).await;
    assert_eq!(
        (&r.body["status"], &r.body["version"]),
        (&json!("paid"), &json!(2))
    );
}

/// Two changes decided on the same version: the store's condition lets
/// exactly one commit; the other is a conflict and writes nothing.
pub async fn lost_race_in_the_store_is_a_conflict<S: OrderStore>(
    store: &S,
    events_of: impl Fn(String) -> std::pin::Pin<Box<dyn Future<Output = u64> + Send>>,
) {
    let id = create(store).await;
    let order = store.load(&id).await.unwrap().unwrap();
    let meta = Meta::default();
    let pay: Change = order.pay(&meta).unwrap();
    let cancel: Change = order.cancel(None, &meta).unwrap();
    store.save(&pay).await.unwrap();
    match store.save(&cancel).await {
        Err(StoreError::Conflict(m)) => assert!(m.contains("no longer at version 1"), "{m}"),
        other => panic!("the second change must conflict, got {other:?}"),
    }
    let order = store.load(&id).await.unwrap().unwrap();
    assert_eq!((order.status.as_str(), order.version), ("paid", 2));
    assert_eq!(events_of(id).await, 2, "OrderCreated and OrderPaid only");
}

/// Pay and cancel the same order at once, both at the version they read:
/// exactly one succeeds, the other is a 409; never both.
pub async fn concurrent_pay_and_cancel<S: OrderStore + 'static>(store: Arc<S>, rounds: usize) {
    for _ in 0..rounds {
        let id = create(&*store).await;
        let pay = {
            let (store, path) = (store.clone(), format!("/orders/{id}/pay"));
            tokio::spawn(async move { call(&*store, "POST", &path, "", Some("1")).await })
        };
        let cancel = {
            let (store, path) = (store.clone(), format!("/orders/{id}/cancel"));
            tokio::spawn(async move { call(&*store, "POST", &path, "", Some("1")).await })
        };
        let (pay, cancel) = (pay.await.unwrap(), cancel.await.unwrap());
        let mut statuses = [pay.status, cancel.status];
        statuses.sort_unstable();
        assert_eq!(
            statuses,
            [200, 409],
            "pay {:?}, cancel {:?}",
            pay.body,
            cancel.body
        );
        let r = call(&*store, "GET", &format!("/orders/{id}"), "", None).await;
        assert_eq!(r.body["version"], 2, "one change applied: {:?}", r.body);
        let winner = if pay.status == 200 {
            "paid"
        } else {
            "cancelled"
        };
        assert_eq!(r.body["status"], winner);
    }
}

/// The JSON of an event's data.
pub fn data(event: &Event) -> Value {
    serde_json::from_str(event.payload.as_str()).unwrap()
}
