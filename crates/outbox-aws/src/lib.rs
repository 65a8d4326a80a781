#![doc = include_str!("../README.md")]

pub mod batch;
pub mod config;
pub mod error;
pub mod testing;
pub mod xray;

pub use config::load_config;
pub use error::{classify, describe, publish_error, store_error};
