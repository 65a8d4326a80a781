//! What a relay counts and times while it runs, readable from other tasks
//! without locks; an exporter (the `outbox relay --metrics-addr` endpoint,
//! or your own) turns it into Prometheus, CloudWatch or logs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Running totals and timings of one relay.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct RelayMetrics {
    pub batches: AtomicU64,
    pub claimed: AtomicU64,
    pub published: AtomicU64,
    /// Events whose publish failed and that wait for another attempt.
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Entries that could not be read, dead-lettered (also in `dead_lettered`).
    pub malformed: AtomicU64,
    pub released: AtomicU64,
    /// Events put back because the target as a whole was down.
    pub deferred: AtomicU64,
    /// Publish attempts that failed, of any kind: each one ends retried,
    /// dead-lettered or deferred.
    pub failed: AtomicU64,
    /// Outages of the target seen (each counted once, when it began).
    pub outages: AtomicU64,
    pub store_errors: AtomicU64,
    /// One claim at the store, empty ones included.
    pub claim_seconds: Histogram,
    /// One publish call, however many events it carried.
    pub publish_seconds: Histogram,
    /// Recording one batch's settlements at the store.
    pub settle_seconds: Histogram,
    /// From an event's `occurred_at` (stamped when it was appended, just
    /// before its transaction commits) to the broker's confirmation.
    pub commit_to_publish_seconds: Histogram,
}

/// Upper bounds of the buckets, in seconds: from 100 µs (a claim on an
/// embedded database) to a minute (an event that waited out an outage).
pub const BUCKETS: [f64; 18] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0,
];

/// A latency histogram with fixed buckets ([`BUCKETS`]) and lock-free
/// recording; the last slot counts what exceeds every bound.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

/// A histogram as read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, observations at or below it)`, cumulative,
    /// one entry per bound of [`BUCKETS`].
    pub buckets: Vec<(f64, u64)>,
    /// Every observation, those above the last bound included.
    pub count: u64,
    pub sum_seconds: f64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let slot = BUCKETS
            .iter()
            .position(|&bound| secs <= bound)
            .unwrap_or(BUCKETS.len());
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        // Saturates rather than wraps: a sum stuck at the maximum is visibly
        // wrong, a wrapped one is quietly so.
        let _ = self
            .sum_micros
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |sum| {
                Some(sum.saturating_add(micros))
            });
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0u64;
        let mut buckets = Vec::with_capacity(BUCKETS.len());
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            cumulative = cumulative.saturating_add(count.load(Ordering::Relaxed));
            buckets.push((*bound, cumulative));
        }
        let over = self.counts[BUCKETS.len()].load(Ordering::Relaxed);
        HistogramSnapshot {
            buckets,
            count: cumulative.saturating_add(over),
            sum_seconds: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

impl HistogramSnapshot {
    /// The bucket bound at or below which `q` (0..=1) of the observations
    /// fall: an upper estimate of that quantile, `None` with no observations
    /// or when it lies above the last bound.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64;
        self.buckets
            .iter()
            .find(|(_, cumulative)| *cumulative >= rank.max(1))
            .map(|(bound, _)| *bound)
    }
}

impl RelayMetrics {
    /// Appends the relay's counters and histograms in the Prometheus text
    /// exposition format (version 0.0.4), names prefixed `outbox_relay_`.
    pub fn write_prometheus(&self, out: &mut String) {
        let counters: [(&str, &AtomicU64, &str); 11] = [
            ("batches", &self.batches, "Claims that returned events."),
            ("claimed", &self.claimed, "Events claimed."),
            ("published", &self.published, "Events the broker confirmed."),
            (
                "retried",
                &self.retried,
                "Events that failed and wait for another attempt.",
            ),
            (
                "failed",
                &self.failed,
                "Publish attempts that failed, of any kind.",
            ),
            (
                "dead_lettered",
                &self.dead_lettered,
                "Events dead-lettered, malformed entries included.",
            ),
            (
                "malformed",
                &self.malformed,
                "Entries that could not be read, dead-lettered.",
            ),
            (
                "released",
                &self.released,
                "Claimed events handed back unsent (deadline, shutdown, failure ahead).",
            ),
            (
                "deferred",
                &self.deferred,
                "Events put back because the target as a whole was down.",
            ),
            ("outages", &self.outages, "Outages of the target seen."),
            (
                "store_errors",
                &self.store_errors,
                "Claims and settlements the store failed.",
            ),
        ];
        for (name, value, help) in counters {
            prometheus::counter(
                out,
                &format!("outbox_relay_{name}_total"),
                help,
                value.load(Ordering::Relaxed),
            );
        }
        let histograms = [
            (
                "claim_duration_seconds",
                &self.claim_seconds,
                "One claim at the store.",
            ),
            (
                "publish_duration_seconds",
                &self.publish_seconds,
                "One publish call.",
            ),
            (
                "settle_duration_seconds",
                &self.settle_seconds,
                "Recording one batch's settlements.",
            ),
            (
                "commit_to_publish_seconds",
                &self.commit_to_publish_seconds,
                "From an event's occurred_at (its append) to the broker's confirmation.",
            ),
        ];
        for (name, histogram, help) in histograms {
            prometheus::histogram(
                out,
                &format!("outbox_relay_{name}"),
                help,
                &histogram.snapshot(),
            );
        }
    }
}

/// Writers of the Prometheus text exposition format: one metric family,
/// with its `HELP` and `TYPE` lines, per call.
pub mod prometheus {
    use std::fmt::Write;

    use super::HistogramSnapshot;

    /// The `Content-Type` of the text format these functions write.
    pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

    pub fn counter(out: &mut String, name: &str, help: &str, value: u64) {
        header(out, name, help, "counter");
        let _ = writeln!(out, "{name} {value}");
    }

    pub fn gauge(out: &mut String, name: &str, help: &str, value: f64) {
        header(out, name, help, "gauge");
        let _ = writeln!(out, "{name} {}", number(value));
    }

    pub fn histogram(out: &mut String, name: &str, help: &str, h: &HistogramSnapshot) {
        header(out, name, help, "histogram");
        for (bound, count) in &h.buckets {
            let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {count}", number(*bound));
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "{name}_sum {}", number(h.sum_seconds));
        let _ = writeln!(out, "{name}_count {}", h.count);
    }

    fn header(out: &mut String, name: &str, help: &str, kind: &str) {
        // HELP text escapes backslashes and line breaks.
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
    }

    fn number(v: f64) -> String {
        if v.is_nan() {
            "NaN".to_owned()
        } else if v.is_infinite() {
            if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
        } else {
            format!("{v}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_cumulative_buckets() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(3600));
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets[0], (0.0001, 2), "100 µs is at or below its bound");
        let at_5ms = s.buckets.iter().find(|(b, _)| *b == 0.005).expect("bound");
        assert_eq!(at_5ms.1, 3);
        assert_eq!(
            s.buckets.last().map(|b| b.1),
            Some(3),
            "an hour is above every bound"
        );
        assert!(
            (s.sum_seconds - 3600.00315).abs() < 1e-6,
            "{}",
            s.sum_seconds
        );
        assert_eq!(s.quantile_bound(0.5), Some(0.0001));
        assert_eq!(s.quantile_bound(0.75), Some(0.005));
        assert_eq!(s.quantile_bound(1.0), None);
        assert_eq!(Histogram::default().snapshot().quantile_bound(0.99), None);
    }

    #[test]
    fn absurd_durations_saturate_the_sum() {
        let h = Histogram::default();
        h.observe(Duration::MAX);
        h.observe(Duration::MAX);
        let s = h.snapshot();
        assert_eq!(s.count, 2);
        assert_eq!(s.sum_seconds, u64::MAX as f64 / 1e6);
    }

    #[test]
    fn prometheus_text_has_every_family_once_with_cumulative_buckets() {
        let m = RelayMetrics::default();
        m.published.fetch_add(7, Ordering::Relaxed);
        m.commit_to_publish_seconds
            .observe(Duration::from_micros(1500));
        let mut out = String::new();
        m.write_prometheus(&mut out);
        assert!(
            out.contains(
                "# TYPE outbox_relay_published_total counter\noutbox_relay_published_total 7\n"
            ),
            "{out}"
        );
        assert!(out.contains("outbox_relay_commit_to_publish_seconds_bucket{le=\"0.001\"} 0\n"));
        assert!(out.contains("outbox_relay_commit_to_publish_seconds_bucket{le=\"0.002\"} 1\n"));
        assert!(out.contains("outbox_relay_commit_to_publish_seconds_bucket{le=\"+Inf\"} 1\n"));
        assert!(out.contains("outbox_relay_commit_to_publish_seconds_count 1\n"));
        for family in [
            "claim_duration_seconds",
            "publish_duration_seconds",
            "settle_duration_seconds",
            "failed_total",
            "dead_lettered_total",
            "retried_total",
        ] {
            let type_line = format!("# TYPE outbox_relay_{family} ");
            assert_eq!(out.matches(&type_line).count(), 1, "{family}");
        }
        // Every sample line is `name[{labels}] value`.
        for line in out.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').expect("name and value");
            assert!(value.parse::<f64>().is_ok() || value == "+Inf", "{line}");
        }
    }
}
