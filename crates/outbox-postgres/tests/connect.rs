//! A store that cannot be opened says why within two seconds: nothing
//! listening, a role or a database the server does not have.

use std::time::{Duration, Instant};

use outbox_postgres::{PostgresOutbox, FIRST_CONNECTION_TIMEOUT};

async fn refusal(url: &str) -> (String, Duration, bool) {
    let started = Instant::now();
    let Err(err) = PostgresOutbox::connect(url).await else {
        panic!("{url}: connected");
    };
    (err.to_string(), started.elapsed(), err.is_retryable())
}

#[tokio::test]
async fn a_store_that_cannot_be_opened_says_why_at_once() {
    let host = "127.0.0.1:5432";
    let cases = [
        (
            "postgres://postgres@127.0.0.1:1/test".to_owned(),
            "connection refused by 127.0.0.1:1: is PostgreSQL running".to_owned(),
            true,
        ),
        (
            format!("postgres://postgres@{host}/no_such_database_7f"),
            format!("PostgreSQL at {host} has no database `no_such_database_7f`"),
            false,
        ),
        (
            format!("postgres://no_such_role_7f:pw@{host}/test"),
            format!("PostgreSQL at {host} refused the credentials of user `no_such_role_7f`"),
            false,
        ),
    ];
    for (url, says, retryable) in cases {
        let (message, took, is_retryable) = refusal(&url).await;
        assert!(message.contains(&says), "{url}: {message}");
        assert!(!message.contains(":pw@"), "{url}: {message}");
        assert_eq!(is_retryable, retryable, "{url}: {message}");
        assert!(
            took < FIRST_CONNECTION_TIMEOUT + Duration::from_millis(500),
            "{url}: took {took:?}"
        );
    }
}
