//! A publisher wrapper that fails on purpose: by script for exact tests, at
//! random for chaos runs (the demo shows the relay riding them out).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{Event, EventId, PublishError, PublishRequest, PublishResult, Publisher};

/// One injected failure.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Refused before reaching the broker; may succeed later.
    Transient,
    /// Refused for good, as a broker rejects a malformed message.
    Permanent,
    /// Refused with a request to wait.
    RetryAfter(Duration),
    /// Reached the broker, but the acknowledgement was lost: reported as a
    /// transient failure, so the retry makes a duplicate.
    LostAck,
    /// The whole call hangs this long before going through, as a broker that
    /// stopped answering; the relay's publish timeout should give up first.
    Hang(Duration),
}

/// Random faults for chaos runs; each rate is a probability per event.
#[derive(Debug, Clone, Default)]
pub struct Chaos {
    pub transient_rate: f64,
    pub lost_ack_rate: f64,
    /// Share of events the broker always rejects (chosen by event id, so the
    /// same event is rejected on every attempt and never delivered).
    pub poison_rate: f64,
    /// Share of calls that hang until the relay's publish timeout.
    pub hang_rate: f64,
    pub hang_for: Duration,
}

/// Counts of what was injected.
#[derive(Debug, Default)]
pub struct InjectedFaults {
    pub transient: AtomicU64,
    pub permanent: AtomicU64,
    pub retry_after: AtomicU64,
    pub lost_acks: AtomicU64,
    /// Events in calls that hung.
    pub hangs: AtomicU64,
}

impl InjectedFaults {
    /// Every failure reported to the relay, in events.
    pub fn total(&self) -> u64 {
        [
            &self.transient,
            &self.permanent,
            &self.retry_after,
            &self.lost_acks,
            &self.hangs,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
}

/// Wraps a publisher and injects [`Fault`]s.
#[derive(Debug, Clone)]
pub struct FaultyPublisher<P> {
    inner: P,
    scripted: Arc<Mutex<HashMap<EventId, VecDeque<Fault>>>>,
    chaos: Chaos,
    injected: Arc<InjectedFaults>,
}

impl<P: Publisher> FaultyPublisher<P> {
    pub fn new(inner: P) -> Self {
        Self {
            inner,
            scripted: Arc::default(),
            chaos: Chaos::default(),
            injected: Arc::default(),
        }
    }

    pub fn with_chaos(mut self, chaos: Chaos) -> Self {
        self.chaos = chaos;
        self
    }

    /// The next publications of `id` fail with these faults, in order.
    pub fn script(&self, id: EventId, faults: impl IntoIterator<Item = Fault>) {
        if let Ok(mut s) = self.scripted.lock() {
            s.entry(id).or_default().extend(faults);
        }
    }

    pub fn injected(&self) -> Arc<InjectedFaults> {
        self.injected.clone()
    }

    pub fn inner(&self) -> &P {
        &self.inner
    }

    /// Whether chaos marks this event as one the broker always rejects.
    pub fn is_poison(&self, id: &EventId) -> bool {
        // The low bits of a v7 id are random: a stable, uniform draw.
        let draw = (id.as_uuid().as_u128() & 0xffff_ffff) as f64 / f64::from(u32::MAX);
        draw < self.chaos.poison_rate
    }

    fn next_fault(&self, event: &Event) -> Option<Fault> {
        if let Some(f) = self
            .scripted
            .lock()
            .ok()
            .and_then(|mut s| s.get_mut(&event.id)?.pop_front())
        {
            return Some(f);
        }
        if self.is_poison(&event.id) {
            return Some(Fault::Permanent);
        }
        let draw = fastrand::f64();
        if draw < self.chaos.transient_rate {
            Some(Fault::Transient)
        } else if draw < self.chaos.transient_rate + self.chaos.lost_ack_rate {
            Some(Fault::LostAck)
        } else {
            None
        }
    }
}

impl<P: Publisher> Publisher for FaultyPublisher<P> {
    fn max_batch_size(&self) -> usize {
        self.inner.max_batch_size()
    }

    async fn publish(&self, request: PublishRequest<'_>) -> Vec<PublishResult> {
        if self.chaos.hang_rate > 0.0 && fastrand::f64() < self.chaos.hang_rate {
            self.injected
                .hangs
                .fetch_add(request.events.len() as u64, Ordering::Relaxed);
            tokio::time::sleep(self.chaos.hang_for).await;
        }
        let mut faults: Vec<Option<Fault>> =
            request.events.iter().map(|e| self.next_fault(e)).collect();
        let hang = faults
            .iter_mut()
            .filter_map(|f| match f {
                Some(Fault::Hang(d)) => {
                    let d = *d;
                    *f = None;
                    Some(d)
                }
                _ => None,
            })
            .max();
        if let Some(hang) = hang {
            self.injected
                .hangs
                .fetch_add(request.events.len() as u64, Ordering::Relaxed);
            tokio::time::sleep(hang).await;
        }
        // Forward what the broker would receive: no fault, or a lost ack.
        let forward: Vec<Event> = request
            .events
            .iter()
            .zip(&faults)
            .filter(|(_, f)| matches!(f, None | Some(Fault::LostAck)))
            .map(|(e, _)| e.clone())
            .collect();
        let mut inner_results = self
            .inner
            .publish(PublishRequest::new(&forward))
            .await
            .into_iter();
        let count = |c: &AtomicU64| {
            c.fetch_add(1, Ordering::Relaxed);
        };
        faults
            .into_iter()
            .map(|fault| match fault {
                // Hangs were turned into `None` above: after the wait, the call goes through.
                None | Some(Fault::Hang(_)) => inner_results
                    .next()
                    .unwrap_or_else(|| Err(PublishError::transient("missing result"))),
                Some(Fault::LostAck) => {
                    let _ = inner_results.next();
                    count(&self.injected.lost_acks);
                    Err(PublishError::transient("injected: acknowledgement lost"))
                }
                Some(Fault::Transient) => {
                    count(&self.injected.transient);
                    Err(PublishError::transient("injected: broker unavailable"))
                }
                Some(Fault::Permanent) => {
                    count(&self.injected.permanent);
                    Err(PublishError::permanent("injected: message rejected"))
                }
                Some(Fault::RetryAfter(after)) => {
                    count(&self.injected.retry_after);
                    Err(PublishError::retry_after(after, "injected: throttled"))
                }
            })
            .collect()
    }
}
