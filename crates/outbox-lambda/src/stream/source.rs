//! The records of one invocation as a [`ClaimSource`], so the core relay
//! publishes them: this file only keeps the books (which record is done,
//! which aggregate waits for what), the relay does the scheduling.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox_core::{
    time, ClaimRequest, ClaimSource, Claimed, ClaimedEvent, Event, LeaseId, Malformed, Settlements,
    StoreError,
};
use outbox_dynamodb::{decode_lambda_record, Change, LambdaStreamEvent};

use crate::dead_letter::DeadLetterSink;

/// The source's handle on what it handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Receipt {
    /// An event, by its number in the invocation.
    Event(usize),
    /// A record that could not be decoded, by its position in the batch.
    Record(usize),
}

/// How hard the invocation tries before giving a record back to Lambda.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    /// Failed attempts of one event allowed before its record goes back.
    pub entry_retries: u32,
    /// A retry due later than this after it was asked for goes back instead.
    pub max_retry_backoff: Duration,
    /// The highest attempt count shown to the relay: its backoff then stays
    /// within `max_retry_backoff` however often an event fails.
    pub attempts_shown: u32,
}

/// A record's progress through the invocation.
#[derive(Debug)]
struct RecordState {
    sequence_number: Option<String>,
    /// Events (or the malformed record itself) not yet published or kept as
    /// dead letters.
    remaining: usize,
    /// Given back to Lambda: something in it failed and will not be retried
    /// in this invocation.
    failed: bool,
}

#[derive(Debug)]
struct Entry {
    event: Event,
    record: usize,
    aggregate: usize,
    /// Failed attempts in this invocation.
    failures: u32,
    done: bool,
}

#[derive(Debug, Default)]
struct Aggregate {
    /// Events not yet done, in record order (= version order).
    queue: VecDeque<usize>,
    /// When its head may be tried again after a failure.
    due: Option<DateTime<Utc>>,
    /// Its prefix is with the relay.
    claimed: bool,
    /// Its head was given back to Lambda: nothing later goes out.
    blocked: bool,
}

/// A record that could not be decoded, kept for the dead-letter sink.
#[derive(Debug)]
struct BadRecord {
    record: usize,
    /// The record's sequence number, or a stable stand-in.
    name: String,
    reason: String,
}

#[derive(Debug, Default)]
struct State {
    records: Vec<RecordState>,
    entries: Vec<Entry>,
    aggregates: Vec<Aggregate>,
    /// Not yet handed to the relay.
    bad_records: Vec<BadRecord>,
    published: usize,
    retries: usize,
    dead_lettered: usize,
    last_error: Option<String>,
}

/// What the invocation did, read once the relay is done.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub records: usize,
    pub ignored: usize,
    pub malformed: usize,
    pub published: usize,
    pub dead_lettered: usize,
    pub retries: usize,
    pub unfinished: usize,
    /// The sequence number to resume from: `Some("")` when only the whole
    /// batch can be retried, `None` when every record is done.
    pub resume_from: Option<String>,
}

/// The records of one invocation: per aggregate, its events in record order.
pub(crate) struct InvocationSource<'a, D> {
    event: &'a LambdaStreamEvent,
    dead_letters: &'a D,
    budget: Budget,
    ignored: usize,
    malformed: usize,
    state: Mutex<State>,
}

impl<'a, D: DeadLetterSink> InvocationSource<'a, D> {
    /// Decodes every record: events join their aggregate's queue in record
    /// order, records that cannot be decoded wait for the dead-letter sink.
    pub(crate) fn new(event: &'a LambdaStreamEvent, dead_letters: &'a D, budget: Budget) -> Self {
        let mut state = State::default();
        let mut index: HashMap<(String, String), usize> = HashMap::new();
        let (mut ignored, mut malformed) = (0, 0);
        for (position, raw) in event.records.iter().enumerate() {
            match decode_lambda_record(raw) {
                Ok(record) => match record.change {
                    Change::Ignored { .. } => {
                        ignored += 1;
                        state.records.push(RecordState {
                            sequence_number: Some(record.sequence_number),
                            remaining: 0,
                            failed: false,
                        });
                    }
                    Change::Events(item) => {
                        let next = state.aggregates.len();
                        let aggregate = *index
                            .entry((item.aggregate_type, item.aggregate_id))
                            .or_insert(next);
                        if aggregate == next {
                            state.aggregates.push(Aggregate::default());
                        }
                        state.records.push(RecordState {
                            sequence_number: Some(record.sequence_number),
                            remaining: item.events.len(),
                            failed: false,
                        });
                        for event in item.events {
                            state.aggregates[aggregate]
                                .queue
                                .push_back(state.entries.len());
                            state.entries.push(Entry {
                                event,
                                record: position,
                                aggregate,
                                failures: 0,
                                done: false,
                            });
                        }
                    }
                },
                Err(error) => {
                    malformed += 1;
                    tracing::warn!(%error, "stream relay: a record cannot be decoded; dead-lettering it");
                    let name = error
                        .sequence_number
                        .clone()
                        .unwrap_or_else(|| stand_in_sequence_number(raw.get()));
                    state.records.push(RecordState {
                        sequence_number: error.sequence_number,
                        remaining: 1,
                        failed: false,
                    });
                    state.bad_records.push(BadRecord {
                        record: position,
                        name,
                        reason: error.reason,
                    });
                }
            }
        }
        Self {
            event,
            dead_letters,
            budget,
            ignored,
            malformed,
            state: Mutex::new(state),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; if something did, the books are
        // still the best record of what happened.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The invocation's figures and the record to resume from.
    pub(crate) fn tally(&self) -> Tally {
        let state = self.lock();
        let unfinished = |r: &RecordState| r.failed || r.remaining > 0;
        let resume_from = state.records.iter().position(unfinished).map(|first| {
            // A record without a sequence number cannot be named: resume from
            // the nearest earlier one (its events come again, which consumers
            // absorb), or have Lambda retry the whole batch.
            state.records[..=first]
                .iter()
                .rev()
                .find_map(|r| r.sequence_number.clone())
                .unwrap_or_default()
        });
        Tally {
            records: state.records.len(),
            ignored: self.ignored,
            malformed: self.malformed,
            published: state.published,
            dead_lettered: state.dead_lettered,
            retries: state.retries,
            unfinished: state.records.iter().filter(|r| unfinished(r)).count(),
            resume_from,
        }
    }

    /// The latest failure recorded, for the invocation's log line.
    pub(crate) fn last_error(&self) -> Option<String> {
        self.lock().last_error.clone()
    }
}

// On a reference, so the handler keeps the books after the relay is done.
impl<D: DeadLetterSink> ClaimSource for &InvocationSource<'_, D> {
    type Receipt = Receipt;

    /// Hands out each aggregate's whole remaining queue (a prefix: the rest
    /// of the invocation), unless its head waits for a retry, is with the
    /// relay already, or was given back to Lambda.
    async fn claim(&self, request: ClaimRequest) -> Result<Claimed<Receipt>, StoreError> {
        let mut state = self.lock();
        let cutoff = request.due_cutoff(Utc::now());
        let shown = self.budget.attempts_shown;
        let mut events = Vec::new();
        let mut next_due: Option<DateTime<Utc>> = None;
        let State {
            entries,
            aggregates,
            bad_records,
            ..
        } = &mut *state;
        for aggregate in aggregates.iter_mut() {
            if events.len() >= request.limit {
                break;
            }
            if aggregate.claimed || aggregate.blocked || aggregate.queue.is_empty() {
                continue;
            }
            if let Some(due) = aggregate.due.filter(|due| *due > cutoff) {
                next_due = Some(next_due.map_or(due, |d| d.min(due)));
                continue;
            }
            aggregate.claimed = true;
            let room = request.limit - events.len();
            for &id in aggregate.queue.iter().take(room) {
                let entry = &entries[id];
                events.push(ClaimedEvent::new(
                    entry.event.clone(),
                    entry.failures.min(shown),
                    Receipt::Event(id),
                ));
            }
        }
        // Undecodable records go to the relay once, with the first claim:
        // it settles them as dead, which keeps them in the sink.
        let malformed: Vec<_> = bad_records
            .iter()
            .map(|bad| Malformed::new(Receipt::Record(bad.record), bad.reason.clone()))
            .collect();
        let handed_out = !events.is_empty() || !malformed.is_empty();
        Ok(Claimed::new(LeaseId::new(), events)
            .with_malformed(malformed)
            .with_next_due(if handed_out { None } else { next_due }))
    }

    async fn settle(
        &self,
        _lease: LeaseId,
        settlements: Settlements<Receipt>,
    ) -> Result<u64, StoreError> {
        let applied = settlements.len() as u64;
        let Settlements {
            published,
            retry,
            dead,
            released,
            deferred,
            ..
        } = settlements;

        // What goes to the dead-letter sink, gathered under the lock and
        // written without it.
        let mut dead_events = Vec::new();
        let mut dead_event_ids = Vec::new();
        let mut dead_records = Vec::new();
        {
            let mut state = self.lock();
            let now = Utc::now();
            let state = &mut *state;
            for receipt in released.iter().chain(&published) {
                state.unclaim(*receipt);
            }
            for receipt in published {
                if let Receipt::Event(id) = receipt {
                    state.finish(id);
                    state.published += 1;
                }
            }
            for (receipt, at, error) in retry {
                state.unclaim(receipt);
                let Receipt::Event(id) = receipt else {
                    continue;
                };
                let entry = &mut state.entries[id];
                entry.failures = entry.failures.saturating_add(1);
                let (failures, aggregate, record) = (entry.failures, entry.aggregate, entry.record);
                let too_late = at > time::add(now, self.budget.max_retry_backoff);
                if failures > self.budget.entry_retries || too_late {
                    tracing::warn!(event = %entry.event.id, %error, failures, "stream relay: giving the record back to Lambda");
                    state.give_back(aggregate, record);
                } else {
                    tracing::debug!(event = %entry.event.id, %error, failures, "stream relay: retrying");
                    state.retries += 1;
                    state.aggregates[aggregate].due = Some(at);
                }
                state.last_error = Some(error);
            }
            for (receipt, at, error) in deferred {
                // The target is down: the relay ends the invocation, and
                // these records go back to Lambda unless claimed again.
                state.unclaim(receipt);
                if let Receipt::Event(id) = receipt {
                    let aggregate = state.entries[id].aggregate;
                    state.aggregates[aggregate].due = Some(at);
                }
                state.last_error = Some(error);
            }
            for (receipt, reason) in dead {
                match receipt {
                    Receipt::Event(id) => {
                        let entry = &state.entries[id];
                        dead_events.push((
                            entry.event.clone(),
                            entry.failures.saturating_add(1),
                            reason,
                        ));
                        dead_event_ids.push(id);
                    }
                    Receipt::Record(record) => {
                        // Handed out once only.
                        if let Some(at) = state.bad_records.iter().position(|b| b.record == record)
                        {
                            let bad = state.bad_records.swap_remove(at);
                            dead_records.push((bad, reason));
                        }
                    }
                }
            }
        }

        // The relay claims nothing until this returns, so nothing later of
        // these aggregates goes out before the sink has answered.
        let events_kept = if dead_events.is_empty() {
            Ok(())
        } else {
            self.dead_letters.dead_letter_events(&dead_events).await
        };
        let mut records_kept = Vec::with_capacity(dead_records.len());
        for (bad, reason) in &dead_records {
            let raw = self.event.records.get(bad.record).map_or("", |r| r.get());
            let kept = self
                .dead_letters
                .dead_letter_record(&bad.name, raw, reason)
                .await;
            records_kept.push((bad.record, kept));
        }

        let mut state = self.lock();
        if let Err(error) = &events_kept {
            tracing::error!(%error, "stream relay: the dead-letter store failed; the records go back to Lambda");
        }
        for id in dead_event_ids {
            state.unclaim(Receipt::Event(id));
            if events_kept.is_ok() {
                state.finish(id);
                state.dead_lettered += 1;
            } else {
                let (aggregate, record) = (state.entries[id].aggregate, state.entries[id].record);
                state.give_back(aggregate, record);
            }
        }
        for (record, kept) in records_kept {
            match kept {
                Ok(()) => state.records[record].remaining = 0,
                Err(error) => {
                    tracing::error!(%error, "stream relay: the dead-letter store failed for a malformed record; it goes back to Lambda");
                    state.records[record].failed = true;
                }
            }
        }
        Ok(applied)
    }
}

impl State {
    /// The relay gave this back: its aggregate may be claimed again.
    fn unclaim(&mut self, receipt: Receipt) {
        if let Receipt::Event(id) = receipt {
            let aggregate = self.entries[id].aggregate;
            self.aggregates[aggregate].claimed = false;
        }
    }

    /// Published or kept as a dead letter: off its aggregate's queue.
    fn finish(&mut self, id: usize) {
        let entry = &mut self.entries[id];
        if entry.done {
            return;
        }
        entry.done = true;
        let record = &mut self.records[entry.record];
        record.remaining = record.remaining.saturating_sub(1);
        let aggregate = &mut self.aggregates[entry.aggregate];
        aggregate.due = None;
        // Done events are always at the front: the relay publishes an
        // aggregate one event at a time and stops it at its first failure.
        if aggregate.queue.front() == Some(&id) {
            aggregate.queue.pop_front();
        } else {
            aggregate.queue.retain(|queued| *queued != id);
        }
    }

    /// The aggregate's head goes back to Lambda with its record; nothing
    /// later of the aggregate is published in this invocation.
    fn give_back(&mut self, aggregate: usize, record: usize) {
        self.aggregates[aggregate].blocked = true;
        self.records[record].failed = true;
    }
}

/// A stable key for a record that has no sequence number, so a retried
/// invocation keeps it under the same name (FNV-1a of the raw record).
pub(crate) fn stand_in_sequence_number(raw: &str) -> String {
    let hash = raw.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("no-sequence-number-{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stand_in_sequence_numbers_are_stable() {
        assert_eq!(
            stand_in_sequence_number("{}"),
            stand_in_sequence_number("{}")
        );
        assert_ne!(
            stand_in_sequence_number("{}"),
            stand_in_sequence_number("[]")
        );
    }
}
