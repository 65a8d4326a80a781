//! What the EventBridge, SQS and SNS publishers share: the publish loop
//! itself ([`publish_in_calls`]: build, size-check, split into calls, send,
//! read per-entry results), so each publisher keeps only what differs: how
//! an event becomes an entry and how one call is made and read.

use std::future::Future;
use std::ops::Range;

use outbox_core::{Event, PublishError, PublishResult};

/// The limits and names of one batch API.
#[derive(Debug, Clone, Copy)]
pub struct CallLimits<'a> {
    /// The API's name, for errors and logs (`PutEvents`, `SendMessageBatch`).
    pub operation: &'a str,
    /// What the call sends to, for logs (a bus, queue URL or topic ARN).
    pub target: &'a str,
    /// Largest entry accepted; larger ones fail permanently, unsent.
    pub max_entry_bytes: usize,
    /// Names that limit in the refusal ("SQS message limit").
    pub entry_limit_name: &'a str,
    /// Most entries a call takes.
    pub max_entries: usize,
    /// Largest total of entry sizes a call takes.
    pub max_request_bytes: usize,
}

/// Publishes `events` in as few calls as the limits allow, in order, and
/// returns one result per event.
///
/// `build` turns an event (and its index in the request) into an entry and
/// `size` measures it as the service does; an entry that cannot be built or
/// is too big gets its permanent failure at once and is never sent. `call`
/// makes one service call with consecutive accepted entries (moved into it)
/// and answers with the result of each entry by its request index, or with
/// the failure of the whole call, which then becomes every entry's result
/// (see [`crate::publish_error`]: a target-wide failure spends no attempts).
pub async fn publish_in_calls<'e, E, F, Fut>(
    events: &'e [Event],
    limits: CallLimits<'_>,
    mut build: impl FnMut(usize, &Event) -> Result<E, PublishError>,
    size: impl Fn(&E) -> usize,
    mut call: F,
) -> Vec<PublishResult>
where
    F: FnMut(Vec<Accepted<'e, E>>) -> Fut,
    Fut: Future<Output = Result<Vec<(usize, PublishResult)>, PublishError>>,
{
    let mut results = Results::new(events.len());
    let accepted = accept(
        events,
        &mut results,
        limits.max_entry_bytes,
        limits.entry_limit_name,
        &mut build,
        size,
    );
    let sizes: Vec<usize> = accepted.iter().map(|a| a.size).collect();
    // Calls are consecutive ranges in order: each takes its entries off the
    // front, so no entry is copied.
    let mut unsent = accepted.into_iter();
    for range in split_calls(&sizes, limits.max_entries, limits.max_request_bytes) {
        let chunk: Vec<Accepted<'e, E>> = unsent.by_ref().take(range.len()).collect();
        let indexes: Vec<usize> = chunk.iter().map(|a| a.index).collect();
        match call(chunk).await {
            Ok(answered) => {
                for (index, result) in answered {
                    results.set(index, result);
                }
            }
            Err(error) => {
                tracing::warn!(
                    %error,
                    target = limits.target,
                    target_wide = error.is_target_failure(),
                    "{} failed",
                    limits.operation
                );
                for index in indexes {
                    results.set(index, Err(error.clone()));
                }
            }
        }
    }
    results.finish(limits.operation)
}

/// Splits entries of the given sizes, in order, into consecutive calls of at
/// most `max_entries` entries whose sizes add up to at most `max_total_bytes`.
/// An entry larger than `max_total_bytes` on its own gets a call of its own
/// (the service then answers for it).
pub fn split_calls(
    sizes: &[usize],
    max_entries: usize,
    max_total_bytes: usize,
) -> Vec<Range<usize>> {
    let max_entries = max_entries.max(1);
    let mut calls = Vec::new();
    let mut start = 0;
    let mut total = 0usize;
    for (i, &size) in sizes.iter().enumerate() {
        let count = i - start;
        if count > 0 && (count == max_entries || total.saturating_add(size) > max_total_bytes) {
            calls.push(start..i);
            start = i;
            total = 0;
        }
        total = total.saturating_add(size);
    }
    if start < sizes.len() {
        calls.push(start..sizes.len());
    }
    calls
}

/// The permanent failure of an entry refused before the network.
pub fn oversize(event: &Event, size: usize, max: usize, limit: &str) -> PublishError {
    PublishError::permanent(format!(
        "event {} is {size} bytes, above the {max}-byte {limit}",
        event.id
    ))
}

/// A failed entry of an SQS or SNS batch call: the sender's fault is
/// permanent unless the code says "slow down"; the service's fault is
/// transient.
pub fn entry_error(
    operation: &str,
    code: &str,
    message: Option<&str>,
    sender_fault: bool,
) -> PublishError {
    let text = match message {
        Some(m) if !m.is_empty() => format!("{operation}: {code}: {m}"),
        _ => format!("{operation}: {code}"),
    };
    if sender_fault && !crate::error::is_retryable_code(code) {
        PublishError::permanent(text)
    } else {
        PublishError::transient(text)
    }
}

/// One slot per entry of a request, filled as calls answer; a slot left
/// empty (a service that did not mention an entry) becomes a transient
/// failure, so every entry gets exactly one result.
#[derive(Debug)]
pub struct Results(Vec<Option<PublishResult>>);

impl Results {
    pub fn new(len: usize) -> Self {
        Self(vec![None; len])
    }

    /// Sets the result of entry `index`; out-of-range indexes are ignored.
    pub fn set(&mut self, index: usize, result: PublishResult) {
        if let Some(slot) = self.0.get_mut(index) {
            *slot = Some(result);
        }
    }

    pub fn finish(self, operation: &str) -> Vec<PublishResult> {
        self.0
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(PublishError::transient(format!(
                        "{operation}: the response did not mention this entry"
                    )))
                })
            })
            .collect()
    }
}

/// An entry worth sending, with what it was built from.
#[derive(Debug)]
pub struct Accepted<'e, E> {
    /// The event's position in the request (and in [`Results`]).
    pub index: usize,
    pub event: &'e Event,
    pub entry: E,
    pub size: usize,
}

/// Builds each event's entry with `build` and measures it with `size`; an
/// entry that cannot be built, or is above `max` bytes (`limit` names the
/// limit in the error), gets its permanent failure in `results` at once and
/// is not sent. Returns the rest, in request order.
pub fn accept<'e, E>(
    events: &'e [Event],
    results: &mut Results,
    max: usize,
    limit: &str,
    mut build: impl FnMut(usize, &Event) -> Result<E, PublishError>,
    size: impl Fn(&E) -> usize,
) -> Vec<Accepted<'e, E>> {
    let mut accepted = Vec::with_capacity(events.len());
    for (index, event) in events.iter().enumerate() {
        match build(index, event) {
            Ok(entry) => {
                let size = size(&entry);
                if size > max {
                    results.set(index, Err(oversize(event, size, max, limit)));
                } else {
                    accepted.push(Accepted {
                        index,
                        event,
                        entry,
                        size,
                    });
                }
            }
            Err(e) => results.set(index, Err(e)),
        }
    }
    accepted
}

/// Longest `MessageGroupId` SQS and SNS FIFO accept.
pub const MAX_GROUP_ID_CHARS: usize = 128;

/// The FIFO message group of an event: its aggregate id when that is a valid
/// group id (up to 128 characters, ASCII letters, digits and punctuation),
/// otherwise a stable digest of the aggregate type and id. Either way one
/// aggregate always maps to one group, which is what keeps its order.
pub fn message_group_id(event: &Event) -> String {
    let id = &event.aggregate_id;
    if id.len() <= MAX_GROUP_ID_CHARS && id.bytes().all(|b| b.is_ascii_graphic()) {
        return id.clone();
    }
    // FNV-1a, 64 bits: stable across builds and platforms, unlike std's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in event
        .aggregate_type
        .bytes()
        .chain([0u8])
        .chain(event.aggregate_id.bytes())
    {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let readable: String = id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(100)
        .collect();
    format!("{readable}~{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use outbox_core::Disposition;

    #[test]
    fn splits_on_count_and_total_size() {
        assert_eq!(split_calls(&[], 10, 100), Vec::<Range<usize>>::new());
        assert_eq!(split_calls(&[1; 25], 10, 100), vec![0..10, 10..20, 20..25]);
        assert_eq!(split_calls(&[40, 40, 40, 10], 10, 100), vec![0..2, 2..4]);
        // Too big for any call: alone, never an empty call.
        assert_eq!(split_calls(&[150, 10], 10, 100), vec![0..1, 1..2]);
        assert_eq!(split_calls(&[100, 1], 10, 100), vec![0..1, 1..2]);
    }

    #[test]
    fn sender_faults_are_permanent_unless_throttled() {
        let d = |code, fault| entry_error("Op", code, None, fault).disposition();
        assert_eq!(d("InvalidParameter", true), Disposition::Permanent);
        assert_eq!(d("ThrottlingException", true), Disposition::Transient);
        assert_eq!(d("InternalError", false), Disposition::Transient);
        assert_eq!(d("Whatever", false), Disposition::Transient);
        let e = entry_error(
            "SendMessageBatch",
            "InvalidParameterValue",
            Some("bad"),
            true,
        );
        assert_eq!(e.message(), "SendMessageBatch: InvalidParameterValue: bad");
    }

    #[test]
    fn unanswered_entries_fail_transiently() {
        let mut r = Results::new(2);
        r.set(1, Ok(()));
        r.set(7, Ok(()));
        let out = r.finish("PutEvents");
        assert_eq!(out.len(), 2);
        assert_eq!(
            out[0].as_ref().unwrap_err().disposition(),
            Disposition::Transient
        );
        assert!(out[1].is_ok());
    }

    fn limits() -> CallLimits<'static> {
        CallLimits {
            operation: "Op",
            target: "t",
            max_entry_bytes: 10,
            entry_limit_name: "test limit",
            max_entries: 2,
            max_request_bytes: 100,
        }
    }

    #[tokio::test]
    async fn the_loop_sends_in_order_and_spreads_call_failures() {
        let events: Vec<Event> = (1..=5)
            .map(|v| Event::builder("Order", "o-1", v, "X").build().unwrap())
            .collect();
        let mut calls = Vec::new();
        let results = publish_in_calls(
            &events,
            limits(),
            // Event 3 is too big; event 5 cannot be built.
            |i, e| match e.aggregate_version {
                3 => Ok(20),
                5 => Err(PublishError::permanent(format!("cannot build {i}"))),
                _ => Ok(1),
            },
            |size: &usize| *size,
            |chunk: Vec<Accepted<'_, usize>>| {
                let indexes: Vec<usize> = chunk.iter().map(|a| a.index).collect();
                calls.push(indexes.clone());
                let first_call = calls.len() == 1;
                async move {
                    if first_call {
                        Ok(indexes.into_iter().map(|i| (i, Ok(()))).collect())
                    } else {
                        Err(PublishError::unavailable("Op: connection refused"))
                    }
                }
            },
        )
        .await;
        assert_eq!(calls, vec![vec![0, 1], vec![3]]);
        assert!(results[0].is_ok() && results[1].is_ok());
        let oversize = results[2].as_ref().unwrap_err();
        assert_eq!(oversize.disposition(), Disposition::Permanent);
        assert!(!oversize.is_target_failure());
        assert!(results[3].as_ref().unwrap_err().is_target_failure());
        assert_eq!(results[4].as_ref().unwrap_err().message(), "cannot build 4");
    }

    #[tokio::test]
    async fn an_empty_request_makes_no_call() {
        let mut called = false;
        let results = publish_in_calls(
            &[],
            limits(),
            |_, _| Ok(1usize),
            |size: &usize| *size,
            |_chunk: Vec<Accepted<'_, usize>>| {
                called = true;
                async { Ok(Vec::new()) }
            },
        )
        .await;
        assert!(results.is_empty() && !called);
    }

    #[test]
    fn group_ids_are_valid_and_stable() {
        let e = |id: &str| Event::builder("Order", id, 1, "X").build().unwrap();
        assert_eq!(message_group_id(&e("order-1")), "order-1");
        let odd = message_group_id(&e("commande ö 1"));
        assert_eq!(odd, message_group_id(&e("commande ö 1")));
        assert_ne!(odd, message_group_id(&e("commande ö 2")));
        assert!(odd.len() <= MAX_GROUP_ID_CHARS && odd.bytes().all(|b| b.is_ascii_graphic()));
        let long = message_group_id(&e(&"a".repeat(300)));
        assert!(long.len() <= MAX_GROUP_ID_CHARS);
    }
}
