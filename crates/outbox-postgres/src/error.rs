use outbox_core::StoreError;

/// Sorts a driver error into what the caller can do about it.
pub(crate) fn map(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // OB409: `outbox_append` found a stale aggregate version.
            if db.is_unique_violation() || code == "OB409" {
                StoreError::Conflict(db.message().to_owned())
            } else if matches!(
                &*code,
                // serialization failure, deadlock, lock timeout, query
                // cancelled, server shutting down or restarting, too many
                // connections, cannot connect now
                "40001" | "40P01" | "55P03" | "57014" | "57P01" | "57P02" | "57P03" | "53300"
            ) || code.starts_with("08")
            {
                StoreError::Unavailable(Box::new(e))
            } else {
                StoreError::Backend(Box::new(e))
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(Box::new(e)),
        _ => StoreError::Backend(Box::new(e)),
    }
}
