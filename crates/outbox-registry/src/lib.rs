#![doc = include_str!("../README.md")]

mod error;
mod store;
mod target;
mod url;

pub use error::RegistryError;
pub use store::{Store, StoreReceipt};
pub use target::{aws_config, eventbridge_client, AnyPublisher, TargetOptions};
pub use url::{DynamoShape, StoreUrl, TargetUrl};
