//! Publishers that need no broker: for development, tests and benchmarks.
//! Real brokers each have their own crate.

pub mod faulty;
pub mod memory;
pub mod null;
pub mod stdout;

pub use faulty::{Chaos, Fault, FaultyPublisher, InjectedFaults};
pub use memory::{memory_broker, Delivery, MemoryPublisher, MemorySubscriber};
pub use null::NullPublisher;
pub use stdout::StdoutPublisher;
