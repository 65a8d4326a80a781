//! Time arithmetic that cannot panic: durations come from users, brokers and
//! Lambda, and an absurd one must saturate or be refused, never overflow.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

/// The longest lease a relay accepts.
pub const MAX_LEASE: Duration = Duration::from_secs(24 * 60 * 60);
/// The longest single wait (poll, publish call, outage pause) a relay accepts.
pub const MAX_WAIT: Duration = Duration::from_secs(24 * 60 * 60);
/// The longest retry delay a policy accepts.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// `at + d`, or the latest representable time.
pub fn add(at: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| at.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// `at - d`, or the earliest representable time.
pub fn sub(at: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| at.checked_sub_signed(d))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// `now + d` as an instant, or one far enough ahead to never come.
pub fn instant_after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(MAX_RETRY_DELAY))
        .unwrap_or(now)
}

/// How long until `at` from `now`; zero if it has passed.
pub fn until(now: DateTime<Utc>, at: DateTime<Utc>) -> Duration {
    (at - now).to_std().unwrap_or(Duration::ZERO)
}

/// Checks a duration a user gave against a bound, naming the setting.
pub fn check_at_most(setting: &str, value: Duration, max: Duration) -> Result<(), String> {
    if value > max {
        return Err(format!(
            "{setting} of {} is too long; at most {} is accepted",
            humanize(value),
            humanize(max)
        ));
    }
    Ok(())
}

fn humanize(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        s if s >= 86_400 => format!("{}d", s / 86_400),
        s if s >= 3_600 => format!("{}h", s / 3_600),
        s if s >= 60 => format!("{}m", s / 60),
        _ => format!("{:?}", d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saturates_instead_of_panicking() {
        let now = Utc::now();
        assert_eq!(add(now, Duration::MAX), DateTime::<Utc>::MAX_UTC);
        assert_eq!(sub(now, Duration::MAX), DateTime::<Utc>::MIN_UTC);
        assert_eq!(
            add(DateTime::<Utc>::MAX_UTC, Duration::from_secs(1)),
            DateTime::<Utc>::MAX_UTC
        );
        let i = Instant::now();
        assert!(instant_after(i, Duration::MAX) > i);
        assert_eq!(until(now, sub(now, Duration::from_secs(5))), Duration::ZERO);
        assert!(check_at_most("lease", Duration::MAX, MAX_LEASE)
            .unwrap_err()
            .contains("lease"));
    }
}
