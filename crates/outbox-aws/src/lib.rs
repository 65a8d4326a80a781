#![doc = include_str!("../README.md")]

pub mod batch;
pub mod config;
pub mod error;
pub mod testing;
pub mod xray;

pub use config::{check_config, load_config, load_config_with_region};
pub use error::{classify, describe, is_target_failure, publish_error, store_error, AwsError};
