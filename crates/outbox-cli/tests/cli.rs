//! The `outbox` binary end to end: the demo's guarantees checked against the
//! database it keeps, then the operator's commands on that database.

use std::path::Path;

use serde_json::Value;

mod common;
use common::{last_json_line, outbox};

fn count(db: &Path, sql: &str) -> u64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let url = format!("sqlite://{}", db.display());
        let outbox = outbox_sqlite::SqliteOutbox::connect(&url)
            .await
            .expect("open");
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(outbox.pool())
            .await
            .expect(sql);
        n as u64
    })
}

#[test]
fn chaos_demo_loses_nothing_and_the_database_agrees() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("demo.db");
    let store = format!("sqlite://{}", db.display());
    let out = outbox(&[
        "demo", "--orders", "2000", "--chaos", "--json", "--store", &store,
    ]);
    assert!(
        out.status.success(),
        "demo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = last_json_line(&out);
    let n = |k: &str| {
        s[k].as_u64()
            .unwrap_or_else(|| panic!("key {k} missing in {s}"))
    };
    assert_eq!(n("orders"), 2000);
    assert_eq!(n("lost"), 0);
    assert_eq!(n("out_of_order"), 0);
    assert_eq!(
        n("delivered_unique") + n("dead_lettered"),
        n("events_written")
    );
    assert!(
        n("relay_restarts") >= 1,
        "chaos must restart the relay: {s}"
    );
    assert!(n("publish_failures_injected") > 0, "{s}");
    assert!(
        n("duplicates_absorbed") > 0,
        "lost acknowledgements must cause absorbed duplicates: {s}"
    );
    for key in ["p50_ms", "p99_ms", "elapsed_s"] {
        assert!(s[key].as_f64().is_some(), "{key} missing in {s}");
    }

    // The kept database tells the same story.
    assert_eq!(count(&db, "SELECT count(*) FROM orders"), 2000);
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox"),
        n("events_written")
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox WHERE status = 'published'"
        ),
        n("events_published")
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox WHERE status = 'dead'"),
        n("dead_lettered")
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM inbox WHERE consumer = 'shipping'"
        ),
        n("delivered_unique")
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox o WHERE status != 'dead' AND NOT EXISTS (SELECT 1 FROM inbox i WHERE i.event_id = o.id)"),
        0
    );

    // Operator commands on the same database.
    let status = last_json_line(&outbox(&["status", "--store", &store, "--json"]));
    assert_eq!(status["pending"], 0);
    let healthy = outbox(&["status", "--store", &store, "--max-pending-age", "1m"]);
    assert!(
        healthy.status.success(),
        "nothing is pending: the check must pass"
    );
    let dead_check = outbox(&["status", "--store", &store, "--fail-on-dead"]);
    assert_eq!(dead_check.status.success(), n("dead_lettered") == 0);
    assert_eq!(status["dead"].as_u64(), Some(n("dead_lettered")));
    // Nothing pending: the latest error is the latest dead letter's.
    assert_eq!(
        status["last_error"].is_string(),
        n("dead_lettered") > 0,
        "{status}"
    );
    let listed = outbox(&["dead-letters", "list", "--store", &store, "--json"]);
    assert!(listed.status.success());
    let letters: Vec<Value> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(letters.len() as u64, n("dead_lettered"));
    assert!(letters.iter().all(|l| l["last_error"]
        .as_str()
        .is_some_and(|e| e.contains("rejected"))));

    if let Some(first) = letters.first() {
        let id = first["event"]["id"].as_str().expect("id");
        assert!(
            outbox(&["dead-letters", "replay", "--store", &store, "--id", id])
                .status
                .success()
        );
        let after = last_json_line(&outbox(&["status", "--store", &store, "--json"]));
        assert_eq!(after["pending"], 1);
        assert_eq!(after["dead"].as_u64(), Some(n("dead_lettered") - 1));
        // The URLs from the environment, as a service would pass secrets.
        let relay = std::process::Command::new(env!("CARGO_BIN_EXE_outbox"))
            .env("OUTBOX_STORE", &store)
            .env("OUTBOX_TO", "null://")
            .args(["relay", "--once"])
            .output()
            .expect("run outbox");
        assert!(
            relay.status.success(),
            "{}",
            String::from_utf8_lossy(&relay.stderr)
        );
        let after = last_json_line(&outbox(&["status", "--store", &store, "--json"]));
        assert_eq!(after["pending"], 0);
        assert_eq!(after["published"].as_u64(), Some(n("events_published") + 1));
    }

    let purged = outbox(&["purge", "--store", &store, "--older-than", "0s"]);
    assert!(purged.status.success());
    let after = last_json_line(&outbox(&["status", "--store", &store, "--json"]));
    assert_eq!(after["published"], 0);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM inbox WHERE consumer = 'shipping'"
        ),
        n("delivered_unique"),
        "purge must not touch the inbox"
    );
}

#[test]
fn demo_refuses_a_database_that_already_has_events() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = format!("sqlite://{}", dir.path().join("d.db").display());
    assert!(outbox(&["demo", "--orders", "5", "--store", &store])
        .status
        .success());
    let again = outbox(&["demo", "--orders", "5", "--store", &store]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("fresh"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

#[test]
fn bad_urls_and_missing_stores_get_clear_errors() {
    let out = outbox(&["status", "--store", "mysql://x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown store"));
    let out = outbox(&["status", "--store", "sqlite:///nonexistent/dir/x.db"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no database"));
    let out = outbox(&["relay", "--store", "sqlite://x.db", "--to", "kafka://x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown target"));
}

#[test]
fn bench_reports_the_keys_it_promises() {
    let out = outbox(&[
        "bench",
        "--events",
        "2000",
        "--rate",
        "500",
        "--duration",
        "1s",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = last_json_line(&out);
    for key in ["drain_events_per_s", "p50_ms", "p99_ms", "rate"] {
        assert!(r[key].as_f64().is_some(), "{key} missing in {r}");
    }
    assert!(
        r["latency_samples"].as_u64().is_some_and(|n| n >= 450),
        "{r}"
    );
}

#[test]
fn status_health_check_fails_when_events_wait_too_long() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("h.db");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let outbox = outbox_sqlite::SqliteOutbox::open(&db).await.expect("open");
        let mut tx = outbox.begin().await.expect("begin");
        outbox
            .append(
                &mut tx,
                &[outbox_testkit::order_event("o-1", 1, "OrderCreated")],
            )
            .await
            .expect("append");
        outbox.commit(tx).await.expect("commit");
    });
    std::thread::sleep(std::time::Duration::from_millis(1_100));
    let store = format!("sqlite://{}", db.display());
    let out = outbox(&["status", "--store", &store, "--max-pending-age", "1s"]);
    assert!(
        !out.status.success(),
        "a 1 s old pending event must fail a 1 s check"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("oldest pending event"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        outbox(&["status", "--store", &store, "--max-pending-age", "1h"])
            .status
            .success()
    );
}

/// A SQLite store with one pending event, for commands that need one.
fn store_with_one_event(dir: &Path) -> String {
    let db = dir.join("t.db");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let outbox = outbox_sqlite::SqliteOutbox::open(&db).await.expect("open");
        let mut tx = outbox.begin().await.expect("begin");
        outbox
            .append(
                &mut tx,
                &[outbox_testkit::order_event("o-1", 1, "OrderCreated")],
            )
            .await
            .expect("append");
        outbox.commit(tx).await.expect("commit");
    });
    format!("sqlite://{}", db.display())
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Exit code 101 is a Rust panic.
fn assert_no_panic(out: &std::process::Output) {
    assert_ne!(out.status.code(), Some(101), "panicked: {}", stderr(out));
    assert!(!stderr(out).contains("panicked"), "{}", stderr(out));
}

#[test]
fn extreme_durations_are_refused_or_saturated_never_a_panic() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_with_one_event(dir.path());
    // Refused with the setting's name.
    for flag in ["--lease", "--poll", "--publish-timeout"] {
        let out = outbox(&[
            "relay", "--store", &store, "--to", "null://", "--once", flag, "1000000y",
        ]);
        assert_no_panic(&out);
        assert!(!out.status.success(), "{flag} 1000000y must be refused");
        let err = stderr(&out);
        assert!(
            err.contains(&format!("{flag} of")) && err.contains("too long"),
            "{flag}: {err}"
        );
    }
    // Beyond what a duration can hold: the parser refuses it.
    let out = outbox(&[
        "purge",
        "--store",
        &store,
        "--older-than",
        "99999999999999999999y",
    ]);
    assert_no_panic(&out);
    assert!(!out.status.success());
    // An age before any time a store holds is refused, naming the flag
    // (see `purge_refuses_an_age_without_a_unit_or_past_the_calendar`).
    let out = outbox(&["purge", "--store", &store, "--older-than", "1000000y"]);
    assert_no_panic(&out);
    assert!(stderr(&out).contains("--older-than"), "{}", stderr(&out));
    // Saturated: no event has waited a million years.
    let out = outbox(&["status", "--store", &store, "--max-pending-age", "1000000y"]);
    assert_no_panic(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    // The event is still there and still flows.
    let out = outbox(&["relay", "--store", &store, "--to", "null://", "--once"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status = last_json_line(&outbox(&["status", "--store", &store, "--json"]));
    assert_eq!(status["published"], 1);
    assert_eq!(status["lost"], 0);
    assert!(status["last_error"].is_null(), "{status}");
}

#[test]
fn a_relay_without_a_region_fails_at_start_naming_the_flag() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_with_one_event(dir.path());
    let home = tempfile::tempdir().expect("home");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_outbox"));
    for var in ["AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"] {
        command.env_remove(var);
    }
    let out = command
        .env("HOME", home.path())
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        // Never wait on an instance metadata service that is not there.
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .args(["relay", "--store", &store, "--to", "sqs://orders", "--once"])
        .output()
        .expect("run outbox");
    assert_no_panic(&out);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no AWS region: pass --region or set AWS_REGION"),
        "{}",
        stderr(&out)
    );
    // Nothing was touched: the event is still pending, not dead.
    let status = last_json_line(&outbox(&["status", "--store", &store, "--json"]));
    assert_eq!(
        (status["pending"].as_u64(), status["dead"].as_u64()),
        (Some(1), Some(0))
    );
}

/// One row the relay cannot read (a BLOB payload, written by some other
/// program) is dead-lettered alone; the rest is published, and
/// `dead-letters list` shows it with its raw fields and the reason.
#[test]
fn a_malformed_row_is_dead_lettered_alone_and_listed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_with_one_event(dir.path());
    let db = dir.path().join("t.db");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let outbox = outbox_sqlite::SqliteOutbox::open(&db).await.expect("open");
        sqlx::query(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, aggregate_version, event_type,
                payload, occurred_at, next_attempt_at, created_at)
             VALUES ('0190a4c2-0000-7000-8000-000000000001', 'Order', 'o-2', 1, 'OrderCreated',
                X'C0FFEE', '2026-01-01T00:00:00Z', 0, 0)",
        )
        .execute(outbox.pool())
        .await
        .expect("insert a damaged row");
    });
    let relay = outbox(&["relay", "--store", &store, "--to", "null://", "--once"]);
    assert!(relay.status.success(), "{}", stderr(&relay));
    let status = last_json_line(&outbox(&["status", "--store", &store, "--json"]));
    assert_eq!(
        (
            status["pending"].as_u64(),
            status["published"].as_u64(),
            status["dead"].as_u64()
        ),
        (Some(0), Some(1), Some(1)),
        "{status}"
    );
    let listed = outbox(&["dead-letters", "list", "--store", &store, "--json"]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    let letters: Vec<Value> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(letters[0]["event"].is_null());
    assert_eq!(letters[0]["raw"]["payload"]["blob"], 3);
    assert!(
        letters[0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("payload holds a BLOB")),
        "{letters:?}"
    );
    let text = outbox(&["dead-letters", "list", "--store", &store]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("MALFORMED"));
}

#[test]
fn purge_refuses_an_age_without_a_unit_or_past_the_calendar() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_with_one_event(dir.path());
    for (age, says) in [
        ("0", "has no unit"),
        ("7", "has no unit"),
        ("1000000y", "longer than 9000 years"),
    ] {
        let out = outbox(&["purge", "--store", &store, "--older-than", age]);
        assert_no_panic(&out);
        assert!(!out.status.success(), "{age}: purged");
        let said = stderr(&out);
        assert!(
            said.contains("--older-than") && said.contains(says),
            "{age}: {said}"
        );
    }
    let status = last_json_line(&outbox(&["status", "--store", &store, "--json"]));
    assert_eq!(status["pending"].as_u64(), Some(1), "{status}");
}
