//! Fuzzing of every decoder of outside data: stream records (Lambda and
//! Streams API), outbox items of both DynamoDB shapes, the CloudEvents
//! form, SQS, SNS and EventBridge deliveries, and SQLite rows.
//!
//! Each decoder gets structure-aware mutations of the real fixtures (fields
//! dropped, duplicated, retyped; odd numbers and strings; huge, empty and
//! deeply nested values; invalid UTF-8) and raw bytes. Every input runs
//! under `catch_unwind` and a watchdog; a refusal must name what was wrong,
//! an accepted input must round-trip. `scripts/fuzz` runs a million inputs
//! per decoder; the tests run a few thousand.

pub mod attrs;
pub mod corpus;
pub mod mutate;
pub mod runner;
pub mod targets;

pub use runner::{run, Options, Stats, Target, Verdict};
pub use targets::{run_named, NAMES};
