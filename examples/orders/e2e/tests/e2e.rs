//! The local end-to-end run of the Orders application, checked against what
//! the tables and queues hold. Needs the emulators (`scripts/services start`
//! and `eval "$(scripts/services env)"`, which scripts/test does).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use aws_sdk_dynamodb::types::AttributeValue;
use orders_e2e::run::{queue_depth, scan_all, shipment_status};
use orders_e2e::setup::{self, Clients};
use orders_e2e::{run, RunConfig};

/// Orders in the run: a few hundred, sized so moto (a few dozen PutEvents
/// entries a second) keeps the test within a few minutes.
const ORDERS: usize = 200;

/// The profile directory this test was built into (target/debug for
/// `cargo test`), where the function binaries are built too.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/e2e-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("the test binary lives in <target>/<profile>/deps")
        .to_path_buf()
}

fn s(item: &HashMap<String, AttributeValue>, name: &str) -> Option<String> {
    match item.get(name) {
        Some(AttributeValue::S(v)) => Some(v.clone()),
        _ => None,
    }
}

fn n(item: &HashMap<String, AttributeValue>, name: &str) -> Option<u64> {
    match item.get(name) {
        Some(AttributeValue::N(v)) => v.parse().ok(),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn orders_end_to_end_with_faults() {
    outbox_aws::testing::require_local_endpoints(&[
        "DYNAMODB",
        "DYNAMODB_STREAMS",
        "EVENTBRIDGE",
        "SQS",
    ]);
    let bin_dir = bin_dir();
    let cargo = PathBuf::from(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    orders_e2e::build_functions(&cargo, &bin_dir).expect("the function binaries build");

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../..");
    let config = RunConfig::new(
        ORDERS,
        bin_dir.clone(),
        root.join("infra/template.yaml"),
        bin_dir.join("e2e-logs"),
    );
    let summary = run(&config).await.expect("the run is carried out");
    println!("{}", summary.render());
    assert!(summary.passed(), "{:#?}", summary.problems);

    // The summary against what the tables and queues hold, read here.
    let clients = Clients::from_env().await;
    let db = &clients.dynamodb;
    let orders = scan_all(db, setup::ORDERS_TABLE).await.unwrap();
    assert_eq!(orders.len() as u64, summary.orders);
    assert_eq!(summary.orders, ORDERS as u64);

    let outbox = scan_all(db, setup::OUTBOX_TABLE).await.unwrap();
    let written: u64 = outbox.iter().filter_map(|i| n(i, "version")).sum();
    assert_eq!(written, summary.events_written);

    let inbox = scan_all(db, setup::SHIPPING_INBOX_TABLE).await.unwrap();
    let ids: Vec<String> = inbox.iter().filter_map(|i| s(i, "sk")).collect();
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "an event recorded twice");
    assert_eq!(ids.len() as u64, summary.delivered);
    assert_eq!(
        summary.delivered, summary.events_written,
        "each event applied once"
    );
    assert_eq!(summary.lost, 0);

    // Each order's shipment is where its events, applied in order, lead.
    let shipments: HashMap<String, (String, u64)> = scan_all(db, setup::SHIPMENTS_TABLE)
        .await
        .unwrap()
        .iter()
        .filter_map(|i| Some((s(i, "order_id")?, (s(i, "status")?, n(i, "order_version")?))))
        .collect();
    assert_eq!(shipments.len(), orders.len());
    for order in &orders {
        let id = s(order, "id").unwrap();
        let status = s(order, "status").unwrap();
        let version = n(order, "version").unwrap();
        assert_eq!(
            shipments.get(&id),
            Some(&(shipment_status(&status).to_owned(), version)),
            "order {id}"
        );
    }
    assert_eq!(summary.out_of_order, 0);

    // Nothing parked anywhere.
    for name in [
        setup::SHIPPING_QUEUE,
        setup::SHIPPING_DLQ,
        setup::FAILURE_QUEUE,
    ] {
        let url = clients
            .sqs
            .get_queue_url()
            .queue_name(name)
            .send()
            .await
            .unwrap()
            .queue_url
            .unwrap();
        assert_eq!(queue_depth(&clients.sqs, &url).await.unwrap(), 0, "{name}");
    }
    assert_eq!(summary.shipping_dlq_messages, 0);
    assert_eq!(summary.failure_destination_messages, 0);
    assert_eq!(summary.dead_letters, 0);

    // The faults did happen, and were absorbed.
    assert!(summary.put_events_failures_injected > 0);
    assert!(summary.functions["PublishEventsFunction"].kills >= 1);
    assert!(summary.functions["ShippingFunction"].kills >= 1);
    assert!(
        summary.stream.partial_failures > 0,
        "no partial batch response was exercised"
    );
    assert!(summary.stream.function_errors > 0);
    assert!(summary.retries > 0);
    for f in [
        "OrdersApiFunction",
        "PublishEventsFunction",
        "ShippingFunction",
    ] {
        assert!(summary.init_ms.contains_key(f), "no init time for {f}");
    }
}
