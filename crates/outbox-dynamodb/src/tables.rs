//! Table creation, in one place: both outbox shapes, the inbox, the
//! dead-letter and checkpoint tables.

use std::time::Duration;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, IndexStatus, KeySchemaElement, KeyType,
    Projection, ProjectionType, ScalarAttributeType, StreamSpecification, StreamViewType,
    TableDescription, TableStatus, TimeToLiveSpecification,
};
use aws_sdk_dynamodb::Client;
use outbox_core::StoreError;

use crate::error::build_error;
use crate::item::PK;
use crate::polling::SK;
use crate::polling::{
    DEAD_INDEX, DEAD_KEY, EXPIRES_AT, PENDING_INDEX, PENDING_KEY, POSITION, PUBLISHED_AT,
    PUBLISHED_INDEX, PUBLISHED_KEY,
};

/// How long to wait for a new table to become ACTIVE.
const ACTIVE_TIMEOUT: Duration = Duration::from_secs(120);

fn attribute(name: &str, kind: ScalarAttributeType) -> Result<AttributeDefinition, StoreError> {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(kind)
        .build()
        .map_err(build_error)
}

fn key(name: &str, kind: KeyType) -> Result<KeySchemaElement, StoreError> {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(kind)
        .build()
        .map_err(build_error)
}

fn index(
    name: &str,
    hash: &str,
    range: &str,
    projection: ProjectionType,
) -> Result<GlobalSecondaryIndex, StoreError> {
    GlobalSecondaryIndex::builder()
        .index_name(name)
        .key_schema(key(hash, KeyType::Hash)?)
        .key_schema(key(range, KeyType::Range)?)
        .projection(Projection::builder().projection_type(projection).build())
        .build()
        .map_err(build_error)
}

/// The stream shape: key `pk`, on-demand, a stream with new images.
pub(crate) async fn create_stream_table(client: &Client, table: &str) -> Result<(), StoreError> {
    let request = client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attribute(PK, ScalarAttributeType::S)?)
        .key_schema(key(PK, KeyType::Hash)?)
        .stream_specification(
            StreamSpecification::builder()
                .stream_enabled(true)
                .stream_view_type(StreamViewType::NewImage)
                .build()
                .map_err(build_error)?,
        );
    created(table, request.send().await)?;
    let described = wait_active(client, table).await?;
    // An existing table must carry the events to the stream relay.
    let streams_images = described.stream_specification().is_some_and(|s| {
        s.stream_enabled()
            && matches!(
                s.stream_view_type(),
                Some(StreamViewType::NewImage | StreamViewType::NewAndOldImages)
            )
    });
    if !streams_images {
        return Err(StoreError::Config(format!(
            "table {table} has no stream with new images (NEW_IMAGE or NEW_AND_OLD_IMAGES): the stream relay cannot read it"
        )));
    }
    Ok(())
}

/// The polling shape: key `pk` + `sk`, the three sparse indexes, TTL on
/// `expires_at`.
pub(crate) async fn create_polling_table(client: &Client, table: &str) -> Result<(), StoreError> {
    let request = client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attribute(PK, ScalarAttributeType::S)?)
        .attribute_definitions(attribute(SK, ScalarAttributeType::N)?)
        .attribute_definitions(attribute(PENDING_KEY, ScalarAttributeType::S)?)
        .attribute_definitions(attribute(DEAD_KEY, ScalarAttributeType::S)?)
        .attribute_definitions(attribute(PUBLISHED_KEY, ScalarAttributeType::S)?)
        .attribute_definitions(attribute(POSITION, ScalarAttributeType::N)?)
        .attribute_definitions(attribute(PUBLISHED_AT, ScalarAttributeType::N)?)
        .key_schema(key(PK, KeyType::Hash)?)
        .key_schema(key(SK, KeyType::Range)?)
        .global_secondary_indexes(index(
            PENDING_INDEX,
            PENDING_KEY,
            POSITION,
            ProjectionType::KeysOnly,
        )?)
        .global_secondary_indexes(index(DEAD_INDEX, DEAD_KEY, POSITION, ProjectionType::All)?)
        .global_secondary_indexes(index(
            PUBLISHED_INDEX,
            PUBLISHED_KEY,
            PUBLISHED_AT,
            ProjectionType::KeysOnly,
        )?);
    let created = created(table, request.send().await)?;
    let described = wait_active(client, table).await?;
    for wanted in [PENDING_INDEX, DEAD_INDEX, PUBLISHED_INDEX] {
        if !described
            .global_secondary_indexes()
            .iter()
            .any(|i| i.index_name() == Some(wanted))
        {
            return Err(StoreError::Config(format!(
                "table {table} lacks the `{wanted}` index of the polling shape"
            )));
        }
    }
    if created {
        enable_ttl(client, table, EXPIRES_AT).await?;
    }
    Ok(())
}

/// A table keyed by two strings (`partition` + `sort`), on-demand, with TTL
/// on `ttl_attribute` if given: the inbox, the dead letters, the checkpoints.
pub(crate) async fn create_string_key_table(
    client: &Client,
    table: &str,
    partition: &str,
    sort: &str,
    ttl_attribute: Option<&str>,
) -> Result<(), StoreError> {
    let request = client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attribute(partition, ScalarAttributeType::S)?)
        .attribute_definitions(attribute(sort, ScalarAttributeType::S)?)
        .key_schema(key(partition, KeyType::Hash)?)
        .key_schema(key(sort, KeyType::Range)?);
    let created = created(table, request.send().await)?;
    wait_active(client, table).await?;
    if let (true, Some(ttl)) = (created, ttl_attribute) {
        enable_ttl(client, table, ttl).await?;
    }
    Ok(())
}

/// Whether the table was created now; an existing table is fine.
fn created<T, E>(
    table: &str,
    result: Result<
        T,
        aws_smithy_runtime_api::client::result::SdkError<
            E,
            aws_smithy_runtime_api::client::orchestrator::HttpResponse,
        >,
    >,
) -> Result<bool, StoreError>
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata
        + std::error::Error
        + Send
        + Sync
        + 'static,
{
    use aws_smithy_types::error::metadata::ProvideErrorMetadata;
    match result {
        Ok(_) => Ok(true),
        Err(e) if e.code() == Some("ResourceInUseException") => Ok(false),
        Err(e) => Err(outbox_aws::store_error(&format!("CreateTable {table}"), e)),
    }
}

async fn enable_ttl(client: &Client, table: &str, attribute: &str) -> Result<(), StoreError> {
    client
        .update_time_to_live()
        .table_name(table)
        .time_to_live_specification(
            TimeToLiveSpecification::builder()
                .enabled(true)
                .attribute_name(attribute)
                .build()
                .map_err(build_error)?,
        )
        .send()
        .await
        .map_err(|e| outbox_aws::store_error(&format!("UpdateTimeToLive {table}"), e))?;
    Ok(())
}

async fn wait_active(client: &Client, table: &str) -> Result<TableDescription, StoreError> {
    let until = tokio::time::Instant::now() + ACTIVE_TIMEOUT;
    loop {
        let described = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|e| outbox_aws::store_error(&format!("DescribeTable {table}"), e))?;
        if let Some(t) = described.table {
            let ready = t.table_status() == Some(&TableStatus::Active)
                && t.global_secondary_indexes()
                    .iter()
                    .all(|i| i.index_status() == Some(&IndexStatus::Active));
            if ready {
                return Ok(t);
            }
        }
        if tokio::time::Instant::now() >= until {
            return Err(StoreError::Unavailable(
                format!("table {table} not ACTIVE after {ACTIVE_TIMEOUT:?}").into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
