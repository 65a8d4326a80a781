//! The append's input, checked once, and its two ways to the server: bound
//! parameters of a prepared statement (`PostgresOutbox::append`, inside a
//! transaction that goes on), or literals in the message that also carries
//! the COMMIT (`PostgresTransaction::commit`, no round trip of its own).

use std::fmt::Write;

use chrono::SecondsFormat;
use outbox_core::{Event, InvalidEvent, StoreError};
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::Postgres;

use crate::Schema;

/// The statement `PostgresOutbox::append` prepares.
pub(crate) const APPEND_SQL: &str = "SELECT {schema}.outbox_append(\
    $1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[], $6::text[], $7::text[], \
    $8::bigint[], $9::text[], $10::text[], $11::timestamptz[], $12::text[], $13::text[], \
    $14::text[], $15::text)";

/// Who wakes sleeping relays (`p_wake` of `outbox_append`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// The commit trigger, once per transaction.
    AtCommit,
    /// The append itself: its COMMIT follows in the same message.
    Now,
    /// Nobody: notifications are off.
    Never,
}

impl Wake {
    fn as_str(self) -> &'static str {
        match self {
            Wake::AtCommit => "commit",
            Wake::Now => "now",
            Wake::Never => "never",
        }
    }
}

/// Events checked for an append: each aggregate once, in first-seen order,
/// with the first and last version appended to it.
#[derive(Debug)]
pub(crate) struct Batch<'a> {
    events: &'a [Event],
    aggregates: Vec<(&'a str, &'a str, i64, i64)>,
}

impl<'a> Batch<'a> {
    /// Checks every event before anything is written: valid, payload within
    /// `max_payload_bytes`, versions going up within each aggregate.
    pub(crate) fn check(events: &'a [Event], max_payload_bytes: usize) -> Result<Self, StoreError> {
        let mut aggregates: Vec<(&str, &str, i64, i64)> = Vec::new();
        for event in events {
            event.validate()?;
            let size = event.payload.as_str().len();
            if size > max_payload_bytes {
                return Err(StoreError::LimitExceeded {
                    limit: "payload size in bytes",
                    actual: size as u64,
                    max: max_payload_bytes as u64,
                });
            }
            if let Some(field) = text_with_nul(event) {
                return Err(StoreError::Invalid(InvalidEvent::new(
                    field,
                    "contains a NUL character, which PostgreSQL text cannot hold",
                )));
            }
            // validate() keeps versions within i64.
            let version = event.aggregate_version as i64;
            let (t, i) = event.aggregate_key();
            match aggregates.iter_mut().find(|a| a.0 == t && a.1 == i) {
                Some(a) if version <= a.3 => {
                    return Err(StoreError::Conflict(format!(
                        "{t}/{i}: version {version} appended after version {}; versions must go up",
                        a.3
                    )))
                }
                Some(a) => a.3 = version,
                None => aggregates.push((t, i, version, version)),
            }
        }
        Ok(Self { events, aggregates })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// `APPEND_SQL` with this batch bound. The values are borrowed from
    /// the events, not copied.
    pub(crate) fn bind<'q>(
        &self,
        query: Query<'q, Postgres, PgArguments>,
        wake: Wake,
    ) -> Query<'q, Postgres, PgArguments>
    where
        'a: 'q,
    {
        let a = &self.aggregates;
        let e: &'a [Event] = self.events;
        let text = |f: fn(&'a Event) -> &'a str| e.iter().map(f).collect::<Vec<_>>();
        let optional = |f: fn(&'a Event) -> Option<&'a str>| e.iter().map(f).collect::<Vec<_>>();
        query
            .bind(a.iter().map(|a| a.0).collect::<Vec<_>>())
            .bind(a.iter().map(|a| a.1).collect::<Vec<_>>())
            .bind(a.iter().map(|a| a.2).collect::<Vec<_>>())
            .bind(a.iter().map(|a| a.3).collect::<Vec<_>>())
            .bind(e.iter().map(|e| e.id.to_string()).collect::<Vec<_>>())
            .bind(text(|e| &e.aggregate_type))
            .bind(text(|e| &e.aggregate_id))
            .bind(
                e.iter()
                    .map(|e| e.aggregate_version as i64)
                    .collect::<Vec<_>>(),
            )
            .bind(text(|e| &e.event_type))
            .bind(text(|e| e.payload.as_str()))
            .bind(e.iter().map(|e| e.occurred_at).collect::<Vec<_>>())
            .bind(optional(|e| e.metadata.traceparent.as_deref()))
            .bind(optional(|e| e.metadata.correlation_id.as_deref()))
            .bind(optional(|e| e.metadata.causation_id.as_deref()))
            .bind(wake.as_str())
    }

    /// The same call as `APPEND_SQL`, with every value written as a
    /// literal, for a message of several statements (which cannot carry
    /// parameters). Text goes in dollar quotes whose tag occurs in none of
    /// the batch's strings, so no value can end its quote, whatever the
    /// server's string settings; NUL, which would end the message, was
    /// refused by `check`.
    pub(crate) fn call_sql(&self, schema: &Schema, wake: Wake) -> String {
        let tag = self.unused_tag();
        let a = &self.aggregates;
        let e = self.events;
        let mut sql = String::with_capacity(
            256 + e
                .iter()
                .map(|e| e.payload.as_str().len() + 160)
                .sum::<usize>(),
        );
        let _ = write!(sql, "SELECT {}.outbox_append(", schema.quoted());
        let texts = |sql: &mut String, values: &mut dyn Iterator<Item = Option<&str>>| {
            sql.push_str("ARRAY[");
            for (n, v) in values.enumerate() {
                if n > 0 {
                    sql.push(',');
                }
                match v {
                    Some(v) => {
                        let _ = write!(sql, "{tag}{v}{tag}");
                    }
                    None => sql.push_str("NULL"),
                }
            }
            sql.push_str("]::text[],");
        };
        let numbers = |sql: &mut String, values: &mut dyn Iterator<Item = i64>| {
            sql.push_str("ARRAY[");
            for (n, v) in values.enumerate() {
                if n > 0 {
                    sql.push(',');
                }
                let _ = write!(sql, "{v}");
            }
            sql.push_str("]::bigint[],");
        };
        texts(&mut sql, &mut a.iter().map(|a| Some(a.0)));
        texts(&mut sql, &mut a.iter().map(|a| Some(a.1)));
        numbers(&mut sql, &mut a.iter().map(|a| a.2));
        numbers(&mut sql, &mut a.iter().map(|a| a.3));
        let ids: Vec<String> = e.iter().map(|e| e.id.to_string()).collect();
        texts(&mut sql, &mut ids.iter().map(|id| Some(id.as_str())));
        texts(
            &mut sql,
            &mut e.iter().map(|e| Some(e.aggregate_type.as_str())),
        );
        texts(
            &mut sql,
            &mut e.iter().map(|e| Some(e.aggregate_id.as_str())),
        );
        numbers(&mut sql, &mut e.iter().map(|e| e.aggregate_version as i64));
        texts(&mut sql, &mut e.iter().map(|e| Some(e.event_type.as_str())));
        texts(&mut sql, &mut e.iter().map(|e| Some(e.payload.as_str())));
        sql.push_str("ARRAY[");
        for (n, e) in e.iter().enumerate() {
            if n > 0 {
                sql.push(',');
            }
            // Digits, `-`, `:`, `T`, `.` and `Z`: nothing to escape.
            let _ = write!(
                sql,
                "'{}'",
                e.occurred_at.to_rfc3339_opts(SecondsFormat::Micros, true)
            );
        }
        sql.push_str("]::timestamptz[],");
        texts(
            &mut sql,
            &mut e.iter().map(|e| e.metadata.traceparent.as_deref()),
        );
        texts(
            &mut sql,
            &mut e.iter().map(|e| e.metadata.correlation_id.as_deref()),
        );
        texts(
            &mut sql,
            &mut e.iter().map(|e| e.metadata.causation_id.as_deref()),
        );
        let _ = write!(sql, "'{}')", wake.as_str());
        sql
    }

    /// `$o$`, or `$o1$`, `$o2$`...: the first dollar-quote tag that no
    /// string of the batch contains.
    fn unused_tag(&self) -> String {
        let strings: Vec<&str> = self.strings().collect();
        let mut tag = "$o$".to_owned();
        let mut n = 0u64;
        while strings.iter().any(|s| s.contains(&tag)) {
            n += 1;
            tag = format!("$o{n}$");
        }
        tag
    }

    fn strings(&self) -> impl Iterator<Item = &str> {
        self.events
            .iter()
            .flat_map(|e| text_fields(e).into_iter().filter_map(|(_, v)| v))
    }
}

/// The text fields of `event` that come from the caller, by name.
fn text_fields(event: &Event) -> [(&'static str, Option<&str>); 7] {
    [
        ("aggregate_type", Some(event.aggregate_type.as_str())),
        ("aggregate_id", Some(event.aggregate_id.as_str())),
        ("event_type", Some(event.event_type.as_str())),
        ("payload", Some(event.payload.as_str())),
        ("traceparent", event.metadata.traceparent.as_deref()),
        ("correlation_id", event.metadata.correlation_id.as_deref()),
        ("causation_id", event.metadata.causation_id.as_deref()),
    ]
}

/// The first text field of `event` holding a NUL character, if any.
fn text_with_nul(event: &Event) -> Option<&'static str> {
    text_fields(event)
        .into_iter()
        .find_map(|(field, value)| value.is_some_and(|v| v.contains('\0')).then_some(field))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, version: u64) -> Event {
        Event::builder("Order", id, version, "OrderPlaced")
            .payload(&serde_json::json!({ "note": "$o$ and $o1$ inside" }))
            .build()
            .unwrap()
    }

    #[test]
    fn the_quote_tag_occurs_in_no_value() {
        let events = [event("a", 1), event("b", 1)];
        let batch = Batch::check(&events, 1024).unwrap();
        assert_eq!(batch.unused_tag(), "$o2$");
        let sql = batch.call_sql(&Schema::new("outbox").unwrap(), Wake::Now);
        assert!(
            sql.contains("$o2${\"note\":\"$o$ and $o1$ inside\"}$o2$"),
            "{sql}"
        );
        assert!(sql.ends_with("'now')"), "{sql}");
    }

    #[test]
    fn nul_characters_are_refused_before_anything_is_sent() {
        let mut e = event("a", 1);
        e.metadata.correlation_id = Some("x\0y".into());
        let err = Batch::check(std::slice::from_ref(&e), 1024).unwrap_err();
        assert!(err.to_string().contains("correlation_id"), "{err}");
    }

    #[test]
    fn versions_must_go_up_within_a_batch() {
        let events = [event("a", 2), event("a", 2)];
        assert!(matches!(
            Batch::check(&events, 1024),
            Err(StoreError::Conflict(_))
        ));
    }
}
