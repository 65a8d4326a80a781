//! The reference store: the whole [`ClaimSource`] contract in memory, in a
//! few lines a reader can check by eye. It passes the store conformance
//! suite, so the relay's own tests run fast against it, and a new store's
//! author can compare behaviour with it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox_core::{
    time, ClaimRequest, ClaimSource, Claimed, ClaimedEvent, DeadLetter, DeadLetterPolicy,
    DeadLetters, Event, EventId, LeaseId, Malformed, OutboxStats, Purge, ReplaySelector, Seen,
    Settlements, Stats, StoreError,
};
use tokio::sync::Notify;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Pending,
    Published,
    Dead,
    Skipped,
}

#[derive(Debug)]
struct Row {
    position: u64,
    /// The aggregate, when the entry says which.
    key: Option<(String, String)>,
    /// The event, or the raw fields of an entry that cannot be read and why.
    event: Result<Event, (serde_json::Value, String)>,
    status: Status,
    attempts: u32,
    next_attempt_at: DateTime<Utc>,
    lease: Option<LeaseId>,
    last_error: Option<String>,
    written_at: DateTime<Utc>,
    published_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Default)]
struct State {
    /// In write order: positions only grow.
    rows: Vec<Row>,
    next_position: u64,
    business: HashSet<String>,
    inbox: HashSet<(String, EventId)>,
}

/// An outbox in memory, with a business table and an inbox beside it.
#[derive(Debug, Clone, Default)]
pub struct MemoryOutbox {
    state: Arc<Mutex<State>>,
    committed: Arc<Notify>,
    policy: DeadLetterPolicy,
}

fn poisoned() -> StoreError {
    StoreError::Backend("the memory outbox's lock is poisoned".into())
}

impl MemoryOutbox {
    pub fn new() -> Self {
        Self::default()
    }

    /// See [`DeadLetterPolicy`]; the default lets later events flow.
    pub fn dead_letter_policy(mut self, policy: DeadLetterPolicy) -> Self {
        self.policy = policy;
        self
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        self.state.lock().map_err(|_| poisoned())
    }

    /// In one transaction: records business row `key` and appends `events`,
    /// or changes nothing and fails.
    pub fn write(&self, key: &str, events: &[Event]) -> Result<(), StoreError> {
        let mut state = self.lock()?;
        for event in events {
            event.validate()?;
        }
        // Versions only go up per aggregate, so write order is version order.
        let mut newest: HashMap<(&str, &str), u64> = HashMap::new();
        for row in &state.rows {
            if let (Some((t, i)), Ok(e)) = (&row.key, &row.event) {
                let v = newest.entry((t, i)).or_default();
                *v = (*v).max(e.aggregate_version);
            }
        }
        for event in events {
            let v = newest.entry(event.aggregate_key()).or_default();
            if event.aggregate_version <= *v {
                return Err(StoreError::Conflict(format!(
                    "{}/{} already has version {} or a later one",
                    event.aggregate_type, event.aggregate_id, event.aggregate_version
                )));
            }
            *v = event.aggregate_version;
        }
        if !state.business.insert(key.to_owned()) {
            return Err(StoreError::Conflict(format!("business row {key} exists")));
        }
        let now = Utc::now();
        for event in events {
            let key = Some((event.aggregate_type.clone(), event.aggregate_id.clone()));
            state.push(key, Ok(event.clone()), now);
        }
        drop(state);
        self.committed.notify_waiters();
        Ok(())
    }

    /// Stores an entry that cannot be read as an event, as a hand edit or
    /// another program might leave one: for tests of what the relay does
    /// with it.
    pub fn write_malformed(
        &self,
        aggregate: Option<(&str, &str)>,
        raw: serde_json::Value,
        reason: &str,
    ) -> Result<(), StoreError> {
        let key = aggregate.map(|(t, i)| (t.to_owned(), i.to_owned()));
        self.lock()?
            .push(key, Err((raw, reason.to_owned())), Utc::now());
        Ok(())
    }

    pub fn business_row_exists(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.lock()?.business.contains(key))
    }

    /// Records `id` as processed by `consumer`.
    pub fn inbox_record(&self, consumer: &str, id: EventId) -> Result<Seen, StoreError> {
        let fresh = self.lock()?.inbox.insert((consumer.to_owned(), id));
        Ok(if fresh { Seen::First } else { Seen::Duplicate })
    }
}

impl State {
    fn push(
        &mut self,
        key: Option<(String, String)>,
        event: Result<Event, (serde_json::Value, String)>,
        now: DateTime<Utc>,
    ) {
        self.next_position += 1;
        self.rows.push(Row {
            position: self.next_position,
            key,
            event,
            status: Status::Pending,
            attempts: 0,
            next_attempt_at: now,
            lease: None,
            last_error: None,
            written_at: now,
            published_at: None,
        });
    }

    fn held_row(&mut self, lease: LeaseId, position: u64) -> Option<&mut Row> {
        self.rows
            .iter_mut()
            .find(|r| r.position == position)
            .filter(|r| r.lease == Some(lease) && r.status == Status::Pending)
    }
}

impl ClaimSource for MemoryOutbox {
    /// The entry's position.
    type Receipt = u64;

    async fn claim(&self, request: ClaimRequest) -> Result<Claimed<u64>, StoreError> {
        let now = Utc::now();
        let cutoff = request.due_cutoff(now);
        let lease = LeaseId::new();
        let until = time::add(now, request.lease);
        let park = self.policy == DeadLetterPolicy::Park;
        let mut state = self.lock()?;
        // Aggregates with an earlier entry that is not claimable now.
        let mut held: HashSet<(String, String)> = HashSet::new();
        let mut events = Vec::new();
        let mut malformed = Vec::new();
        let mut next_due: Option<DateTime<Utc>> = None;
        for row in &mut state.rows {
            if events.len() + malformed.len() == request.limit {
                break;
            }
            let blocks = match row.status {
                Status::Pending => row.next_attempt_at > cutoff,
                Status::Dead => park,
                Status::Published | Status::Skipped => false,
            };
            if row.status == Status::Pending && row.next_attempt_at > cutoff {
                next_due =
                    Some(next_due.map_or(row.next_attempt_at, |d| d.min(row.next_attempt_at)));
            }
            let is_held = row.key.as_ref().is_some_and(|k| held.contains(k));
            if blocks || is_held {
                if let Some(k) = &row.key {
                    held.insert(k.clone());
                }
                continue;
            }
            if row.status != Status::Pending
                || request.written_before.is_some_and(|at| row.written_at > at)
            {
                continue;
            }
            row.lease = Some(lease);
            row.next_attempt_at = until;
            match &row.event {
                Ok(event) => {
                    events.push(ClaimedEvent::new(event.clone(), row.attempts, row.position))
                }
                Err((_, reason)) => malformed.push(Malformed::new(row.position, reason.clone())),
            }
        }
        let claimed = Claimed::new(lease, events).with_malformed(malformed);
        Ok(if claimed.is_empty() {
            claimed.with_next_due(next_due)
        } else {
            claimed
        })
    }

    async fn settle(&self, lease: LeaseId, s: Settlements<u64>) -> Result<u64, StoreError> {
        let now = Utc::now();
        let mut state = self.lock()?;
        let mut applied = 0;
        let mut apply = |position: u64, f: &mut dyn FnMut(&mut Row)| {
            if let Some(row) = state.held_row(lease, position) {
                f(row);
                row.lease = None;
                applied += 1;
            }
        };
        for p in s.published {
            apply(p, &mut |r| {
                r.status = Status::Published;
                r.published_at = Some(now);
            });
        }
        for p in s.released {
            apply(p, &mut |r| r.next_attempt_at = now);
        }
        for (p, at, error) in s.retry {
            apply(p, &mut |r| {
                r.attempts = r.attempts.saturating_add(1);
                r.next_attempt_at = at;
                r.last_error = Some(error.clone());
            });
        }
        for (p, at, error) in s.deferred {
            apply(p, &mut |r| {
                r.next_attempt_at = at;
                r.last_error = Some(error.clone());
            });
        }
        for (p, error) in s.dead {
            apply(p, &mut |r| {
                r.status = Status::Dead;
                r.attempts = r.attempts.saturating_add(1);
                r.last_error = Some(error.clone());
            });
        }
        drop(state);
        Ok(applied)
    }

    async fn wait_for_events(&self, max_wait: Duration) {
        let _ = tokio::time::timeout(max_wait, self.committed.notified()).await;
    }
}

impl Stats for MemoryOutbox {
    async fn stats(&self) -> Result<OutboxStats, StoreError> {
        let state = self.lock()?;
        let mut stats = OutboxStats::default();
        let mut latest_error: Option<(DateTime<Utc>, &str)> = None;
        for row in &state.rows {
            match row.status {
                Status::Pending => {
                    stats.pending += 1;
                    if stats.oldest_pending_at.is_none() {
                        stats.oldest_pending_at = Some(match &row.event {
                            Ok(e) => e.occurred_at,
                            Err(_) => row.next_attempt_at,
                        });
                    }
                    if let Some(error) = &row.last_error {
                        if latest_error.is_none_or(|(at, _)| row.next_attempt_at >= at) {
                            latest_error = Some((row.next_attempt_at, error));
                        }
                    }
                }
                Status::Published => stats.published += 1,
                Status::Dead => stats.dead += 1,
                Status::Skipped => {}
            }
        }
        stats.last_error = latest_error.map(|(_, e)| e.to_owned());
        Ok(stats)
    }
}

fn selected(which: &ReplaySelector, row: &Row) -> bool {
    match which {
        ReplaySelector::Ids(ids) => row.event.as_ref().is_ok_and(|e| ids.contains(&e.id)),
        _ => true,
    }
}

impl MemoryOutbox {
    fn change_dead(&self, which: &ReplaySelector, f: impl Fn(&mut Row)) -> Result<u64, StoreError> {
        let mut state = self.lock()?;
        let mut changed = 0;
        for row in state.rows.iter_mut().filter(|r| r.status == Status::Dead) {
            if selected(which, row) {
                f(row);
                changed += 1;
            }
        }
        drop(state);
        self.committed.notify_waiters();
        Ok(changed)
    }
}

impl DeadLetters for MemoryOutbox {
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let state = self.lock()?;
        Ok(state
            .rows
            .iter()
            .filter(|r| r.status == Status::Dead)
            .take(limit)
            .map(|r| match &r.event {
                Ok(e) => DeadLetter::event(e.clone(), r.attempts, r.last_error.clone()),
                Err((raw, _)) => DeadLetter::malformed(
                    format!("position {}", r.position),
                    raw.clone(),
                    r.last_error.clone(),
                ),
            })
            .collect())
    }

    async fn replay(&self, which: ReplaySelector) -> Result<u64, StoreError> {
        let now = Utc::now();
        self.change_dead(&which, |r| {
            r.status = Status::Pending;
            r.attempts = 0;
            r.next_attempt_at = now;
            r.lease = None;
        })
    }

    async fn skip(&self, which: ReplaySelector) -> Result<u64, StoreError> {
        self.change_dead(&which, |r| r.status = Status::Skipped)
    }
}

impl Purge for MemoryOutbox {
    async fn purge_published(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut state = self.lock()?;
        let count = state.rows.len();
        state.rows.retain(|r| {
            !(r.status == Status::Published && r.published_at.is_some_and(|t| t < before))
        });
        Ok((count - state.rows.len()) as u64)
    }
}
