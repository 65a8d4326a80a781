//! A fresh schema per test on the PostgreSQL of the machine, dropped at the end.

#![allow(dead_code)]

use outbox_core::StoreError;
use outbox_postgres::PostgresOutbox;
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool};

/// `OUTBOX_TEST_POSTGRES`, or the machine's PostgreSQL.
pub fn url() -> String {
    std::env::var("OUTBOX_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

pub fn unique_schema(prefix: &str) -> String {
    format!("t_{prefix}_{}", uuid::Uuid::new_v4().simple())
}

pub async fn pool(url: &str, size: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(std::time::Duration::from_secs(30))
        .connect(url)
        .await
        .expect("connect to PostgreSQL")
}

/// An outbox in a new schema, migrated, with an `orders` business table.
pub async fn outbox(prefix: &str, pool_size: u32) -> PostgresOutbox {
    let schema = unique_schema(prefix);
    let outbox = PostgresOutbox::from_pool(pool(&url(), pool_size).await)
        .schema(&schema)
        .expect("schema name");
    outbox.migrate().await.expect("migrate");
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE TABLE {schema}.orders (id TEXT PRIMARY KEY)"
    )))
    .execute(outbox.pool())
    .await
    .expect("business table");
    outbox
}

/// The same schema through another pool (another relay process, say).
pub async fn same_outbox(outbox: &PostgresOutbox, url: &str, pool_size: u32) -> PostgresOutbox {
    PostgresOutbox::from_pool(pool(url, pool_size).await)
        .schema(outbox.schema_name())
        .expect("schema name")
}

/// `SELECT count(*) ...` with `{s}` the outbox's quoted schema.
pub async fn count(outbox: &PostgresOutbox, sql: &str) -> i64 {
    let sql = sql.replace("{s}", &format!("\"{}\"", outbox.schema_name()));
    sqlx::query_scalar(AssertSqlSafe(sql.clone()))
        .fetch_one(outbox.pool())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Drops the test's schema when the test ends (even on a panic).
pub struct DropSchema(pub String);

impl Drop for DropSchema {
    fn drop(&mut self) {
        let schema = self.0.clone();
        // A thread of its own: the test's runtime may be shutting down.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async {
                    if let Ok(pool) = PgPoolOptions::new()
                        .max_connections(1)
                        .connect(&url())
                        .await
                    {
                        let _ = sqlx::raw_sql(AssertSqlSafe(format!(
                            "DROP SCHEMA IF EXISTS {schema} CASCADE"
                        )))
                        .execute(&pool)
                        .await;
                        pool.close().await;
                    }
                });
            }
        })
        .join();
    }
}

pub fn db(e: sqlx::Error) -> StoreError {
    StoreError::Backend(Box::new(e))
}
