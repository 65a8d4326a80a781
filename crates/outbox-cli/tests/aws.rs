//! The `outbox` binary against the local AWS emulators (DynamoDB Local for
//! DynamoDB and Streams, moto for EventBridge and SQS): the seed-001 demo
//! under chaos, checked against the queue and the tables it leaves, and the
//! standalone relay publishing a DynamoDB outbox to SQS.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use outbox_aws::testing::{require_local_endpoints, unique_name};
use outbox_core::Event;

mod common;
use common::{last_json_line, outbox};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

async fn scan_count(client: &aws_sdk_dynamodb::Client, table: &str) -> u64 {
    let mut n = 0;
    let mut start = None;
    loop {
        let page = client
            .scan()
            .table_name(table)
            .select(aws_sdk_dynamodb::types::Select::Count)
            .set_exclusive_start_key(start)
            .send()
            .await
            .expect("scan");
        n += page.count() as u64;
        start = page.last_evaluated_key;
        if start.is_none() {
            return n;
        }
    }
}

#[test]
fn dynamodb_chaos_demo_loses_nothing_and_the_queue_and_inbox_agree() {
    require_local_endpoints(&["DYNAMODB", "DYNAMODB_STREAMS", "EVENTBRIDGE", "SQS"]);
    let table = unique_name("demo");
    let store = format!("dynamodb://{table}");
    let bus = format!("eventbridge://{table}");
    let out = outbox(&[
        "demo", "--store", &store, "--to", &bus, "--orders", "500", "--chaos", "--json",
    ]);
    assert!(
        out.status.success(),
        "demo failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let s = last_json_line(&out);
    let n = |k: &str| {
        s[k].as_u64()
            .unwrap_or_else(|| panic!("`{k}` missing from {s}"))
    };
    assert_eq!(n("orders"), 500);
    assert_eq!(n("lost"), 0);
    assert_eq!(n("out_of_order"), 0);
    assert_eq!(
        n("delivered_unique") + n("dead_lettered"),
        n("events_written")
    );
    assert!(n("relay_restarts") > 0, "chaos restarted no relay: {s}");
    assert!(
        n("publish_failures_injected") > 0,
        "chaos injected nothing: {s}"
    );

    runtime().block_on(async {
        let config = outbox_aws::load_config().await;
        let dynamodb = aws_sdk_dynamodb::Client::new(&config);
        // The inbox holds exactly the events Shipping applied.
        assert_eq!(
            scan_count(&dynamodb, &format!("{table}-inbox")).await,
            n("delivered_unique")
        );
        assert_eq!(scan_count(&dynamodb, &format!("{table}-orders")).await, 500);
        assert_eq!(
            scan_count(&dynamodb, &format!("{table}-dead-letters")).await,
            n("dead_lettered")
        );
        // Every delivery was applied and deleted: nothing is left in the queue.
        let sqs = aws_sdk_sqs::Client::new(&config);
        let url = sqs
            .get_queue_url()
            .queue_name(format!("{table}-shipping"))
            .send()
            .await
            .expect("queue")
            .queue_url
            .expect("url");
        let attrs = sqs
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::All)
            .send()
            .await
            .expect("attributes")
            .attributes
            .unwrap_or_default();
        for name in [
            aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages,
            aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
        ] {
            assert_eq!(
                attrs.get(&name).map(String::as_str),
                Some("0"),
                "{name:?} left in the queue"
            );
        }
    });
}

#[test]
fn relay_publishes_a_dynamodb_outbox_to_sqs_in_aggregate_order() {
    require_local_endpoints(&["DYNAMODB", "DYNAMODB_STREAMS", "SQS"]);
    let table = unique_name("relay");
    let rt = runtime();
    let (queue_url, written) = rt.block_on(async {
        let config = outbox_aws::load_config().await;
        let dynamodb = aws_sdk_dynamodb::Client::new(&config);
        let outbox = outbox_dynamodb::DynamoOutbox::new(dynamodb, &table);
        outbox.create_table_if_missing().await.expect("table");
        let sqs = aws_sdk_sqs::Client::new(&config);
        let queue = outbox_sqs::setup::ensure_queue(&sqs, &table, false)
            .await
            .expect("queue");
        let mut written = Vec::new();
        for round in 1..=3u64 {
            for agg in 0..8 {
                let event = Event::builder("Order", format!("o-{agg}"), round, "OrderUpdated")
                    .payload(&serde_json::json!({ "round": round }))
                    .build()
                    .expect("event");
                outbox
                    .transaction()
                    .events([event.clone()])
                    .commit()
                    .await
                    .expect("commit");
                written.push(event);
            }
        }
        (queue.url, written)
    });

    // The relay never creates tables; here they exist, and --once returns
    // when the stream has nothing more.
    let out = outbox(&[
        "relay",
        "--store",
        &format!("dynamodb://{table}"),
        "--to",
        &format!("sqs://{queue_url}"),
        "--once",
    ]);
    assert!(
        out.status.success(),
        "relay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    rt.block_on(async {
        let config = outbox_aws::load_config().await;
        let receiver =
            outbox_sqs::SqsReceiver::new(aws_sdk_sqs::Client::new(&config), queue_url.clone());
        let received = receiver
            .collect_events(written.len(), Duration::from_secs(30))
            .await
            .expect("receive");
        let ids: HashSet<_> = received.iter().map(|r| r.event.id).collect();
        for e in &written {
            assert!(ids.contains(&e.id), "event {} not delivered", e.id);
        }
        let mut last: HashMap<String, u64> = HashMap::new();
        let mut seen = HashSet::new();
        for r in &received {
            if !seen.insert(r.event.id) {
                continue;
            }
            let prev = last.insert(r.event.aggregate_id.clone(), r.event.aggregate_version);
            assert!(
                prev.is_none_or(|p| p < r.event.aggregate_version),
                "{} v{} after v{prev:?}",
                r.event.aggregate_id,
                r.event.aggregate_version
            );
        }
        // A second --once finds nothing new: the checkpoints held.
        let again = outbox(&[
            "relay",
            "--store",
            &format!("dynamodb://{table}"),
            "--to",
            &format!("sqs://{queue_url}"),
            "--once",
        ]);
        assert!(again.status.success());
        let more = receiver
            .receive(10, Duration::from_secs(2))
            .await
            .expect("receive");
        assert!(more.is_empty(), "republished after a clean run: {more:?}");
    });
}

#[test]
fn a_missing_queue_or_bus_fails_the_start_naming_the_url() {
    require_local_endpoints(&["SQS", "EVENTBRIDGE"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("o.db");
    runtime().block_on(async {
        let outbox = outbox_sqlite::SqliteOutbox::open(&db).await.expect("open");
        let mut tx = outbox.begin().await.expect("begin");
        let event = Event::builder("Order", "o-1", 1, "OrderCreated")
            .build()
            .expect("event");
        outbox.append(&mut tx, &[event]).await.expect("append");
        outbox.commit(tx).await.expect("commit");
    });
    let store = format!("sqlite://{}", db.display());
    let queue = unique_name("no-such-queue");
    let bus = unique_name("no-such-bus");
    for (target, says) in [
        (
            format!("sqs://{queue}"),
            format!("queue `{queue}` does not exist"),
        ),
        (
            format!("eventbridge://{bus}"),
            format!("event bus `{bus}` does not exist"),
        ),
    ] {
        let out = outbox(&["relay", "--store", &store, "--to", &target, "--once"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{target} must fail the start");
        assert!(
            err.contains(&format!("target {target}")) && err.contains(&says),
            "{target}: {err}"
        );
    }
    // Nothing was spent on the events.
    let status = last_json_line(&outbox(&["status", "--store", &store, "--json"]));
    assert_eq!(status["pending"], 1);
    assert_eq!(status["dead"], 0);
}
