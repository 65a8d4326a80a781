//! A publisher wrapper that fails on purpose: by script for exact tests, at
//! random for chaos runs. It lives in `outbox-core` (the `outbox demo` ships
//! it) and is re-exported here under its testkit names.

pub use outbox_core::publishers::faulty::{Chaos, Fault, FaultyPublisher, InjectedFaults};
