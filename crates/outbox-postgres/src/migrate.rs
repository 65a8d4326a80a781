//! Schema migrations shipped with the crate, applied in order, once, into
//! the configured schema.

use sqlx::{AssertSqlSafe, PgPool};

use crate::error::map;
use crate::Schema;
use outbox_core::StoreError;

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/0001_outbox.sql")),
    (2, include_str!("../migrations/0002_claim_and_settle.sql")),
    (3, include_str!("../migrations/0003_queue_and_leases.sql")),
    (4, include_str!("../migrations/0004_append_function.sql")),
    (5, include_str!("../migrations/0005_settle_by_key.sql")),
];

/// The newest schema version this build knows.
pub const SCHEMA_VERSION: i64 = 5;

pub(crate) async fn run(pool: &PgPool, schema: &Schema) -> Result<(), StoreError> {
    let mut tx = pool.begin().await.map_err(map)?;
    // Two processes starting together migrate one after the other.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("outbox migrate {}", schema.name()))
        .execute(&mut *tx)
        .await
        .map_err(map)?;
    let setup = format!(
        "CREATE SCHEMA IF NOT EXISTS {s};
         CREATE TABLE IF NOT EXISTS {s}.outbox_schema_migrations (
             version BIGINT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        s = schema.quoted()
    );
    sqlx::raw_sql(AssertSqlSafe(setup))
        .execute(&mut *tx)
        .await
        .map_err(map)?;
    let applied: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT COALESCE(MAX(version), 0) FROM {}.outbox_schema_migrations",
        schema.quoted()
    )))
    .fetch_one(&mut *tx)
    .await
    .map_err(map)?;
    if applied > SCHEMA_VERSION {
        return Err(StoreError::Config(format!(
            "the outbox schema {} is at version {applied}, newer than this build knows ({SCHEMA_VERSION}); upgrade outbox-postgres",
            schema.name()
        )));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > applied) {
        sqlx::raw_sql(AssertSqlSafe(schema.render(sql)))
            .execute(&mut *tx)
            .await
            .map_err(map)?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {}.outbox_schema_migrations (version) VALUES ($1)",
            schema.quoted()
        )))
        .bind(version)
        .execute(&mut *tx)
        .await
        .map_err(map)?;
    }
    tx.commit().await.map_err(map)
}
