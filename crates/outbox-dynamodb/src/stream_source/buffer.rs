//! The in-memory side of the stream source: events read from the stream and
//! not yet settled, their claims, and per shard which records are settled.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use outbox_core::{Claimed, ClaimedEvent, Event, EventId, LeaseId};

/// The source's handle on one buffered event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamReceipt(pub(crate) u64);

#[derive(Debug, Clone)]
enum Origin {
    Stream { shard: String, record: u64 },
    Replay,
}

#[derive(Debug)]
struct Entry {
    event: Event,
    attempts: u32,
    /// When the stream says it was written (or when it was replayed): what a
    /// drain's `written_before` sees.
    written: DateTime<Utc>,
    due: DateTime<Utc>,
    lease: Option<(LeaseId, Instant)>,
    origin: Origin,
    /// The latest failure, and when it was recorded.
    last_error: Option<(DateTime<Utc>, String)>,
}

/// One stream record read and not yet checkpointed.
#[derive(Debug)]
struct Slot {
    number: u64,
    sequence_number: String,
    unsettled: usize,
}

/// Per shard: read records in order, and the settled prefix not yet written.
#[derive(Debug, Default)]
pub(crate) struct ShardLog {
    next_number: u64,
    slots: VecDeque<Slot>,
}

impl ShardLog {
    pub(crate) fn is_settled(&self) -> bool {
        self.slots.is_empty()
    }
}

/// Which events a claim may take: due by, and written before, these times.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    pub due_by: DateTime<Utc>,
    pub written_before: DateTime<Utc>,
}

impl Window {
    pub(crate) fn now() -> Self {
        Self::due_by(Utc::now())
    }

    pub(crate) fn due_by(at: DateTime<Utc>) -> Self {
        Self {
            due_by: at,
            written_before: DateTime::<Utc>::MAX_UTC,
        }
    }
}

/// What settling did.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    pub count: u64,
    /// Replayed events now settled: their replay items can go.
    pub finished_replays: Vec<EventId>,
}

#[derive(Debug, Default)]
pub(crate) struct Buffer {
    next_id: u64,
    /// By id, which is stream read order.
    entries: BTreeMap<u64, Entry>,
    pub(crate) logs: HashMap<String, ShardLog>,
    replays: HashSet<EventId>,
    /// Shards whose settled prefix grew: shard id -> new checkpoint.
    pub(crate) advanced: HashMap<String, String>,
    pub(crate) published: u64,
}

impl Buffer {
    fn push_entry(&mut self, event: Event, origin: Origin, written: Option<DateTime<Utc>>) {
        let id = self.next_id;
        self.next_id += 1;
        let now = Utc::now();
        let written = written.unwrap_or(now);
        self.entries.insert(
            id,
            Entry {
                event,
                attempts: 0,
                written,
                due: now,
                lease: None,
                origin,
                last_error: None,
            },
        );
    }

    /// A record read from `shard`, with the events it carries (none for an
    /// ignored or dead-lettered record) and when the stream says it was
    /// written (the read time if it does not say).
    pub(crate) fn push_record(
        &mut self,
        shard: &str,
        sequence_number: &str,
        events: Vec<Event>,
        written: Option<DateTime<Utc>>,
    ) {
        let log = self.logs.entry(shard.to_owned()).or_default();
        let number = log.next_number;
        log.next_number += 1;
        log.slots.push_back(Slot {
            number,
            sequence_number: sequence_number.to_owned(),
            unsettled: events.len(),
        });
        for event in events {
            self.push_entry(
                event,
                Origin::Stream {
                    shard: shard.to_owned(),
                    record: number,
                },
                written,
            );
        }
        self.advance(shard);
    }

    /// A replayed dead letter; ignored if it is buffered already.
    pub(crate) fn push_replay(&mut self, event: Event) -> bool {
        if !self.replays.insert(event.id) {
            return false;
        }
        self.push_entry(event, Origin::Replay, None);
        true
    }

    pub(crate) fn is_replay_buffered(&self, id: &EventId) -> bool {
        self.replays.contains(id)
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Buffered events that came from the stream (replays are counted apart).
    pub(crate) fn stream_pending(&self) -> u64 {
        self.entries.len() as u64 - self.replays.len() as u64
    }

    pub(crate) fn oldest_pending_at(&self) -> Option<DateTime<Utc>> {
        self.entries.values().map(|e| e.event.occurred_at).min()
    }

    /// The events a claim may take now, in stream order: per aggregate the
    /// prefix up to its first event that is held or backing off. Taking them
    /// in stream order keeps the settled prefix, and so the checkpoint,
    /// close behind what was published.
    fn claimable(&self, limit: usize, window: Window) -> Vec<u64> {
        let instant = Instant::now();
        let mut blocked: HashSet<(&str, &str)> = HashSet::new();
        let mut ids = Vec::new();
        // The record of the last event taken: a batch ends on a record's
        // boundary, since a checkpoint moves by whole records and a record
        // split across batches would be published again after a crash.
        let mut last_record: Option<&Origin> = None;
        for (id, e) in &self.entries {
            if ids.len() >= limit {
                let same_record = matches!(
                    (last_record, &e.origin),
                    (Some(Origin::Stream { shard: a, record: r }), Origin::Stream { shard: b, record: q })
                        if a == b && r == q
                );
                if !same_record {
                    break;
                }
            }
            let key = (
                e.event.aggregate_type.as_str(),
                e.event.aggregate_id.as_str(),
            );
            if blocked.contains(&key) {
                continue;
            }
            let held = e.lease.is_some_and(|(_, until)| until > instant);
            if held || e.due > window.due_by || e.written > window.written_before {
                blocked.insert(key);
                continue;
            }
            ids.push(*id);
            last_record = Some(&e.origin);
        }
        ids
    }

    /// Claims what is due at or before `cutoff`, per aggregate a prefix.
    pub(crate) fn claim(
        &mut self,
        limit: usize,
        lease: Duration,
        window: Window,
    ) -> Claimed<StreamReceipt> {
        let lease_id = LeaseId::new();
        let expires = super::later(lease);
        let mut events = Vec::new();
        for id in self.claimable(limit, window) {
            if let Some(entry) = self.entries.get_mut(&id) {
                entry.lease = Some((lease_id, expires));
                events.push(ClaimedEvent::new(
                    entry.event.clone(),
                    entry.attempts,
                    StreamReceipt(id),
                ));
            }
        }
        let next_due = if events.is_empty() {
            self.next_due()
        } else {
            None
        };
        Claimed::new(lease_id, events).with_next_due(next_due)
    }

    /// Whether a claim now would hand out anything.
    pub(crate) fn has_due(&self) -> bool {
        !self.claimable(1, Window::now()).is_empty()
    }

    /// When the earliest aggregate head not held by a claim comes due.
    fn next_due(&self) -> Option<DateTime<Utc>> {
        let now = Instant::now();
        let mut seen: HashSet<(&str, &str)> = HashSet::new();
        self.entries
            .values()
            .filter(|e| seen.insert(e.event.aggregate_key()))
            .filter(|e| e.lease.is_none_or(|(_, until)| until <= now))
            .map(|e| e.due)
            .min()
    }

    /// The most recent failure recorded on a buffered event.
    pub(crate) fn last_error(&self) -> Option<String> {
        self.entries
            .values()
            .filter_map(|e| e.last_error.as_ref())
            .max_by_key(|(at, _)| *at)
            .map(|(_, error)| error.clone())
    }

    fn held_by(&self, receipt: StreamReceipt, lease: LeaseId) -> Option<&Entry> {
        self.entries
            .get(&receipt.0)
            .filter(|e| e.lease.is_some_and(|(id, _)| id == lease))
    }

    /// The dead-letter rows of receipts still held by `lease`.
    pub(crate) fn dead_rows(
        &self,
        lease: LeaseId,
        dead: &[(StreamReceipt, String)],
    ) -> Vec<(Event, u32, String)> {
        dead.iter()
            .filter_map(|(r, error)| {
                self.held_by(*r, lease)
                    .map(|e| (e.event.clone(), e.attempts.saturating_add(1), error.clone()))
            })
            .collect()
    }

    /// Removes a settled event; true if it was held by `lease`.
    fn remove(&mut self, receipt: StreamReceipt, lease: LeaseId, applied: &mut Applied) -> bool {
        if self.held_by(receipt, lease).is_none() {
            return false;
        }
        let Some(entry) = self.entries.remove(&receipt.0) else {
            return false;
        };
        match entry.origin {
            Origin::Replay => {
                self.replays.remove(&entry.event.id);
                applied.finished_replays.push(entry.event.id);
            }
            Origin::Stream { shard, record } => {
                if let Some(log) = self.logs.get_mut(&shard) {
                    if let Some(front) = log.slots.front().map(|s| s.number) {
                        if let Some(slot) = record
                            .checked_sub(front)
                            .and_then(|i| log.slots.get_mut(i as usize))
                        {
                            slot.unsettled = slot.unsettled.saturating_sub(1);
                        }
                    }
                }
                self.advance(&shard);
            }
        }
        applied.count += 1;
        true
    }

    /// Drops the settled prefix of a shard's records, noting the new checkpoint.
    fn advance(&mut self, shard: &str) {
        let Some(log) = self.logs.get_mut(shard) else {
            return;
        };
        let mut last = None;
        while log.slots.front().is_some_and(|s| s.unsettled == 0) {
            last = log.slots.pop_front().map(|s| s.sequence_number);
        }
        if let Some(seq) = last {
            self.advanced.insert(shard.to_owned(), seq);
        }
    }

    pub(crate) fn published(
        &mut self,
        lease: LeaseId,
        receipts: &[StreamReceipt],
        applied: &mut Applied,
    ) {
        for r in receipts {
            if self.remove(*r, lease, applied) {
                self.published += 1;
            }
        }
    }

    pub(crate) fn dead(
        &mut self,
        lease: LeaseId,
        receipts: &[StreamReceipt],
        applied: &mut Applied,
    ) {
        for r in receipts {
            self.remove(*r, lease, applied);
        }
    }

    pub(crate) fn retry(
        &mut self,
        lease: LeaseId,
        retries: &[(StreamReceipt, DateTime<Utc>, String)],
        applied: &mut Applied,
    ) {
        self.reschedule(lease, retries, true, applied);
    }

    /// Due again at the time, attempts unchanged: the target was down.
    pub(crate) fn defer(
        &mut self,
        lease: LeaseId,
        deferred: &[(StreamReceipt, DateTime<Utc>, String)],
        applied: &mut Applied,
    ) {
        self.reschedule(lease, deferred, false, applied);
    }

    fn reschedule(
        &mut self,
        lease: LeaseId,
        entries: &[(StreamReceipt, DateTime<Utc>, String)],
        count_attempt: bool,
        applied: &mut Applied,
    ) {
        for (r, at, error) in entries {
            if self.held_by(*r, lease).is_some() {
                if let Some(e) = self.entries.get_mut(&r.0) {
                    if count_attempt {
                        e.attempts = e.attempts.saturating_add(1);
                    }
                    e.due = *at;
                    e.lease = None;
                    e.last_error = Some((Utc::now(), error.clone()));
                    applied.count += 1;
                }
            }
        }
    }

    pub(crate) fn release(
        &mut self,
        lease: LeaseId,
        receipts: &[StreamReceipt],
        applied: &mut Applied,
    ) {
        for r in receipts {
            if self.held_by(*r, lease).is_some() {
                if let Some(e) = self.entries.get_mut(&r.0) {
                    e.lease = None;
                    applied.count += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(agg: &str, v: u64) -> Event {
        Event::builder("Order", agg, v, "E").build().unwrap()
    }

    #[test]
    fn checkpoint_is_the_settled_prefix() {
        let mut b = Buffer::default();
        b.push_record("s", "10", vec![ev("a", 1), ev("a", 2)], None);
        b.push_record("s", "11", vec![], None);
        b.push_record("s", "12", vec![ev("b", 1)], None);
        assert!(b.advanced.is_empty());
        let claimed = b.claim(10, Duration::from_secs(5), Window::now());
        assert_eq!(claimed.events.len(), 3);
        let receipts: Vec<_> = claimed.events.iter().map(|c| c.receipt).collect();
        let mut applied = Applied::default();
        // b settles first: the checkpoint cannot pass record 10 yet.
        b.published(claimed.lease, &receipts[2..], &mut applied);
        assert!(b.advanced.is_empty());
        b.published(claimed.lease, &receipts[..2], &mut applied);
        assert_eq!(b.advanced.get("s").map(String::as_str), Some("12"));
        assert!(b.logs["s"].is_settled());
        assert_eq!(b.published, 3);
    }

    #[test]
    fn held_and_backing_off_events_hold_their_aggregate() {
        let mut b = Buffer::default();
        b.push_record("s", "1", vec![ev("a", 1)], None);
        b.push_record("s", "2", vec![ev("a", 2), ev("b", 1)], None);
        let first = b.claim(1, Duration::from_secs(5), Window::now());
        assert_eq!(first.events.len(), 1);
        let second = b.claim(10, Duration::from_secs(5), Window::now());
        let got: Vec<_> = second
            .events
            .iter()
            .map(|c| c.event.aggregate_id.clone())
            .collect();
        assert_eq!(got, vec!["b"]);
        let mut applied = Applied::default();
        let later = Utc::now() + chrono::Duration::seconds(60);
        b.retry(
            first.lease,
            &[(first.events[0].receipt, later, "x".into())],
            &mut applied,
        );
        let empty = b.claim(10, Duration::from_secs(5), Window::now());
        assert!(empty.events.is_empty());
        assert_eq!(empty.next_due, Some(later));
        assert_eq!(b.last_error().as_deref(), Some("x"));
        // A stale lease changes nothing.
        b.release(LeaseId::new(), &[first.events[0].receipt], &mut applied);
        assert_eq!(applied.count, 1);
    }

    #[test]
    fn deferred_keeps_attempts_and_cutoff_holds_later_events() {
        let mut b = Buffer::default();
        let before = Utc::now() - chrono::Duration::seconds(1);
        b.push_record("s", "1", vec![ev("a", 1)], None);
        // Read after a drain started: that drain leaves it.
        assert!(b
            .claim(
                10,
                Duration::from_secs(5),
                Window {
                    due_by: Utc::now(),
                    written_before: before
                }
            )
            .events
            .is_empty());
        let claimed = b.claim(10, Duration::from_secs(5), Window::now());
        assert_eq!(claimed.events.len(), 1);
        let mut applied = Applied::default();
        let at = Utc::now() + chrono::Duration::milliseconds(30);
        b.defer(
            claimed.lease,
            &[(claimed.events[0].receipt, at, "target down".into())],
            &mut applied,
        );
        assert_eq!(applied.count, 1);
        assert_eq!(b.last_error().as_deref(), Some("target down"));
        let again = b.claim(10, Duration::from_secs(5), Window::due_by(at));
        assert_eq!(again.events.len(), 1);
        assert_eq!(again.events[0].attempts, 0, "a deferral spends no attempt");
    }
}
