//! Schema migrations shipped with the crate, applied in order, once.
//!
//! Applied versions live in `outbox_schema_migrations`, not in
//! `PRAGMA user_version`, which belongs to the application.

use sqlx::SqlitePool;

use crate::error::map;
use outbox_core::StoreError;

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/0001_outbox_and_inbox.sql")),
    (
        2,
        include_str!("../migrations/0002_skipped_dead_letters.sql"),
    ),
    (3, include_str!("../migrations/0003_lease_table.sql")),
];

pub(crate) async fn run(pool: &SqlitePool) -> Result<(), StoreError> {
    // IMMEDIATE: two processes starting together migrate one after the other.
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.map_err(map)?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS outbox_schema_migrations (
            version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)",
    )
    .execute(&mut *tx)
    .await
    .map_err(map)?;
    let applied: i64 =
        sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM outbox_schema_migrations")
            .fetch_one(&mut *tx)
            .await
            .map_err(map)?;
    let newest = MIGRATIONS.last().map_or(0, |m| m.0);
    if applied > newest {
        return Err(StoreError::Config(format!(
            "the database schema is at version {applied}, newer than this build knows ({newest}); upgrade outbox-sqlite"
        )));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > applied) {
        sqlx::raw_sql(*sql).execute(&mut *tx).await.map_err(map)?;
        sqlx::query("INSERT INTO outbox_schema_migrations (version) VALUES (?)")
            .bind(version)
            .execute(&mut *tx)
            .await
            .map_err(map)?;
    }
    tx.commit().await.map_err(map)
}
