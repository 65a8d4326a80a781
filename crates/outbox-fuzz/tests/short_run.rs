//! A short run of every decoder's fuzzing (the full run is `scripts/fuzz`):
//! a few thousand inputs each, a fixed seed, no panic, hang, unclear
//! refusal or broken round trip allowed.

use std::time::Duration;

use outbox_fuzz::{run_named, Options};

/// The same inputs on every run; `scripts/fuzz` draws new ones.
const SEED: u64 = 20_261_122;

fn short_run(name: &str, inputs: u64) {
    let options = Options {
        seed: SEED,
        inputs,
        out: std::env::temp_dir().join("outbox-fuzz-tests"),
        // Generous: a debug build on a busy machine.
        slow: Duration::from_secs(5),
        hang: Duration::from_secs(60),
        ..Options::default()
    };
    let stats = run_named(name, &options).expect("the decoder runs");
    assert_eq!(stats.inputs, inputs);
    assert_eq!(
        stats.failed(),
        0,
        "{name}: failing inputs:\n{}",
        stats.failures.join("\n")
    );
    // Both paths reached: some inputs accepted, some refused.
    assert!(stats.accepted > 0, "{name}: nothing accepted: {stats:?}");
    assert!(stats.refused > 0, "{name}: nothing refused: {stats:?}");
}

#[test]
fn lambda_stream() {
    short_run("lambda-stream", 3_000);
}

#[test]
fn streams_api() {
    short_run("streams-api", 3_000);
}

#[test]
fn item_stream_shape() {
    short_run("item-stream-shape", 3_000);
}

#[test]
fn item_polling_shape() {
    short_run("item-polling-shape", 3_000);
}

#[test]
fn cloudevent() {
    short_run("cloudevent", 3_000);
}

#[test]
fn sqs_delivery() {
    short_run("sqs-delivery", 3_000);
}

#[test]
fn sns_delivery() {
    short_run("sns-delivery", 3_000);
}

#[test]
fn eventbridge_delivery() {
    short_run("eventbridge-delivery", 3_000);
}

#[test]
fn sqlite_rows() {
    short_run("sqlite-rows", 2_000);
}

/// Through the machine's PostgreSQL: every input writes and reads real rows.
#[test]
fn postgres_rows() {
    short_run("postgres-rows", 2_000);
}

#[test]
fn unknown_decoders_are_refused() {
    let err = run_named("nope", &Options::default()).unwrap_err();
    assert!(err.contains("lambda-stream"), "{err}");
}
