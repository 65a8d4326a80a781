#![doc = include_str!("../README.md")]

mod error;
mod store;
mod target;
mod url;

pub use error::RegistryError;
pub use store::{Migrated, Store, StoreReceipt};
pub use target::{aws_config, eventbridge_client, AnyPublisher, TargetOptions};
pub use url::{
    DynamoShape, StoreUrl, TargetUrl, DEFAULT_AMQP_EXCHANGE, DEFAULT_NATS_STREAM,
    DEFAULT_POSTGRES_SCHEMA,
};
