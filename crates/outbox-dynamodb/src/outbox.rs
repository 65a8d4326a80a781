//! The outbox table a service writes its events into.

use std::sync::Arc;

use aws_sdk_dynamodb::Client;
use outbox_core::StoreError;

use crate::limits::Limits;
use crate::transaction::Transaction;

/// How events are laid out in the outbox table, and so how the relay reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Shape {
    /// One item per aggregate, rewritten by each transaction; the relay reads
    /// the table's DynamoDB Stream (see [`crate::item`]).
    #[default]
    Stream,
    /// One item per event with sparse indexes; the relay polls
    /// (see [`crate::polling`]).
    Polling,
}

/// An outbox table: the place and shape events are written in.
#[derive(Debug, Clone)]
pub struct DynamoOutbox {
    client: Client,
    table: Arc<str>,
    shape: Shape,
    limits: Limits,
}

impl DynamoOutbox {
    /// The stream shape with DynamoDB's limits, until told otherwise.
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: Arc::from(table.into()),
            shape: Shape::Stream,
            limits: Limits::default(),
        }
    }

    pub fn shape(mut self, shape: Shape) -> Self {
        self.shape = shape;
        self
    }

    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    pub fn shape_kind(&self) -> Shape {
        self.shape
    }

    pub fn limits_in_use(&self) -> Limits {
        self.limits
    }

    /// Creates the table for this shape unless it exists, and waits until it
    /// (and its indexes) are ACTIVE.
    pub async fn create_table_if_missing(&self) -> Result<(), StoreError> {
        match self.shape {
            Shape::Stream => crate::tables::create_stream_table(&self.client, &self.table).await,
            Shape::Polling => crate::tables::create_polling_table(&self.client, &self.table).await,
        }
    }

    /// A new transaction whose events go to this outbox.
    pub fn transaction(&self) -> Transaction {
        Transaction::for_outbox(self.clone())
    }
}
