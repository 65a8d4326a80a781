//! What the EventBridge, SQS and SNS publishers share: splitting a request
//! into service calls, refusing oversize entries, and reading per-entry
//! failures of batch calls.

use std::ops::Range;

use outbox_core::{Event, PublishError, PublishResult};

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
