//! Relay processes for the demo on PostgreSQL: `outbox relay`, run from this
//! same program. With chaos they are killed (SIGKILL) at random moments and
//! started again, and their broker connection is cut through a fault proxy
//! for a few seconds, then restored, repeatedly. At the end they are stopped
//! with SIGTERM and waited for.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use outbox_testkit::proxy::FaultProxy;

use super::RelayRun;
use crate::CliError;

/// How the relay processes are started.
#[derive(Debug)]
pub struct RelaySettings {
    /// This program.
    pub exe: PathBuf,
    /// `--store` of every relay.
    pub store: String,
    /// `--to` of every relay (through the proxy, with chaos).
    pub target: String,
    /// `--source` of every relay.
    pub source: String,
    pub count: u32,
    /// Where each relay's standard error goes, one file per relay slot.
    pub logs: PathBuf,
    /// The proxy between the relays and the broker, with chaos.
    pub proxy: Option<FaultProxy>,
}

/// The relays' tuning for the demo: small batches and a short lease, so a
/// killed relay's claims come free within seconds; a publish timeout well
/// inside the lease.
const RELAY_FLAGS: &[&str] = &[
    "--batch-size",
    "50",
    "--max-attempts",
    "25",
    "--poll",
    "100ms",
    "--lease",
    "3s",
    "--publish-timeout",
    "1s",
];

/// How often the supervisor looks at its relays.
const TICK: Duration = Duration::from_millis(50);
/// Pause before starting again a relay that exited on its own.
const RESTART_PAUSE: Duration = Duration::from_millis(500);
/// How long a relay has to stop after SIGTERM.
const STOP_WAIT: Duration = Duration::from_secs(15);
/// Between chaos kills, in ms.
const KILL_EVERY_MS: std::ops::Range<u64> = 300..1_500;
/// Between broker cuts, and how long each lasts, in ms.
const CUT_EVERY_MS: std::ops::Range<u64> = 500..2_000;
/// Until the first kill and the first cut, in ms: early, so even a short
/// run has its faults while events flow.
const FIRST_FAULT_MS: std::ops::Range<u64> = 150..500;
const CUT_FOR_MS: std::ops::Range<u64> = 1_000..3_000;
/// The end of a relay's log shown when it fails, in bytes.
const LOG_TAIL_BYTES: u64 = 2_000;

/// One relay slot: its process while one runs.
#[derive(Debug)]
struct Slot {
    number: u32,
    child: Option<Child>,
    started: Instant,
    /// When to start a relay in this slot again, if none runs.
    restart_at: Option<Instant>,
    log: PathBuf,
}

/// N relay processes with their supervisor.
#[derive(Debug)]
pub struct RelayProcesses {
    settings: RelaySettings,
    cuts: Arc<AtomicU64>,
}

fn after(range: std::ops::Range<u64>) -> Instant {
    Instant::now() + Duration::from_millis(fastrand::u64(range))
}

impl RelayProcesses {
    pub fn new(settings: RelaySettings) -> Self {
        Self {
            settings,
            cuts: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Times the broker connection was cut so far.
    pub fn cuts(&self) -> Arc<AtomicU64> {
        self.cuts.clone()
    }

    fn spawn(&self, slot: &mut Slot) -> Result<(), CliError> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&slot.log)
            .map_err(|e| CliError::Check(format!("cannot open {}: {e}", slot.log.display())))?;
        let s = &self.settings;
        // The URLs may hold passwords: the environment keeps them out of
        // the process list, where any user of the machine reads arguments.
        let child = Command::new(&s.exe)
            .arg("relay")
            .env("OUTBOX_STORE", &s.store)
            .env("OUTBOX_TO", &s.target)
            .args(["--source", &s.source])
            .args(RELAY_FLAGS)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                CliError::Check(format!(
                    "cannot start relay process {} ({}): {e}",
                    slot.number,
                    s.exe.display()
                ))
            })?;
        slot.child = Some(child);
        slot.started = Instant::now();
        slot.restart_at = None;
        Ok(())
    }

    /// Runs the relays until `run.stop`, then stops them with SIGTERM.
    pub async fn run(self, run: RelayRun) -> Result<(), CliError> {
        let RelayRun {
            chaos,
            writing,
            totals,
            mut stop,
        } = run;
        let mut slots: Vec<Slot> = (1..=self.settings.count)
            .map(|number| Slot {
                number,
                child: None,
                started: Instant::now(),
                restart_at: None,
                log: self.settings.logs.join(format!("relay-{number}.log")),
            })
            .collect();
        for slot in &mut slots {
            self.spawn(slot)?;
        }
        let proxy = self.settings.proxy.as_ref().filter(|_| chaos);
        let mut kills = 0u64;
        let mut next_kill = after(FIRST_FAULT_MS);
        let mut next_cut = after(FIRST_FAULT_MS);
        let mut cut_until: Option<Instant> = None;
        let mut last_cut: Option<Instant> = None;
        // Asked to stop before each fault happened once: they happen now,
        // and the relays stop once the broker is back.
        let mut stopping = false;
        let outcome = 'supervise: loop {
            if stopping {
                tokio::time::sleep(TICK).await;
            } else {
                tokio::select! {
                    _ = stop.wait_for(|s| *s).map(|r| r.is_ok()) => stopping = true,
                    () = tokio::time::sleep(TICK) => {}
                }
            }
            let faults_done =
                !chaos || (kills > 0 && (proxy.is_none() || self.cuts.load(Ordering::Relaxed) > 0));
            if stopping && faults_done && cut_until.is_none() {
                break Ok(());
            }
            let now = Instant::now();
            if stopping {
                next_kill = next_kill.min(now);
                next_cut = next_cut.min(now);
            }
            // Relays that exited on their own: a relay started while the
            // broker was cut fails its start-up check; anything else that
            // exits at once is a failure to report.
            if let Err(e) = self.reap(&mut slots, cut_until.is_some(), last_cut) {
                break Err(e);
            }
            // Chaos runs while orders are written, and at least until each
            // fault happened once, so a short run sees both.
            let cuts = self.cuts.load(Ordering::Relaxed);
            let active = chaos && (writing.load(Ordering::Relaxed) || kills == 0 || cuts == 0);
            if let (Some(proxy), Some(until)) = (proxy, cut_until) {
                if now >= until {
                    proxy.restore();
                    cut_until = None;
                    next_cut = after(CUT_EVERY_MS);
                }
            } else if let (Some(proxy), true) = (proxy, active && now >= next_cut) {
                proxy.cut();
                self.cuts.fetch_add(1, Ordering::Relaxed);
                cut_until = Some(after(CUT_FOR_MS));
                last_cut = Some(now);
            }
            if active && now >= next_kill {
                next_kill = after(KILL_EVERY_MS);
                let running: Vec<usize> = (0..slots.len())
                    .filter(|&i| slots[i].child.is_some())
                    .collect();
                if !running.is_empty() {
                    let slot = &mut slots[running[fastrand::usize(..running.len())]];
                    if let Some(mut child) = slot.child.take() {
                        // SIGKILL: no chance to release claims or finish the batch.
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                    kills += 1;
                    slot.restart_at = Some(now);
                }
            }
            // Relays start only while the broker can be reached: one started
            // during a cut would fail its start-up check.
            if cut_until.is_none() {
                for slot in slots.iter_mut() {
                    if slot.child.is_none() && slot.restart_at.is_some_and(|at| now >= at) {
                        if let Err(e) = self.spawn(slot) {
                            break 'supervise Err(e);
                        }
                        totals.restarts.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        };
        if let Some(proxy) = proxy {
            proxy.restore();
        }
        let stopped = stop_all(&mut slots).await;
        outcome.and(stopped)
    }

    /// Notes relays that exited on their own and schedules their restart.
    fn reap(
        &self,
        slots: &mut [Slot],
        cut_now: bool,
        last_cut: Option<Instant>,
    ) -> Result<(), CliError> {
        for slot in slots.iter_mut() {
            let Some(child) = slot.child.as_mut() else {
                continue;
            };
            let status = child
                .try_wait()
                .map_err(|e| CliError::Check(format!("cannot watch relay {}: {e}", slot.number)))?;
            let Some(status) = status else {
                continue;
            };
            slot.child = None;
            let cut_since_start = cut_now || last_cut.is_some_and(|at| at >= slot.started);
            if !cut_since_start {
                return Err(CliError::Check(format!(
                    "relay process {} exited ({status}) with the broker reachable:\n{}",
                    slot.number,
                    log_tail(&slot.log)
                )));
            }
            tracing::warn!(relay = slot.number, %status, "relay exited during a broker cut; starting it again");
            slot.restart_at = Some(Instant::now() + RESTART_PAUSE);
        }
        Ok(())
    }
}

/// SIGTERM to every relay, then waits for each; a relay that does not stop
/// in time is killed, and either is an error.
async fn stop_all(slots: &mut [Slot]) -> Result<(), CliError> {
    for slot in slots.iter() {
        if let Some(child) = &slot.child {
            // No signal API in the standard library: the `kill` command sends it.
            let sent = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if !sent.is_ok_and(|s| s.success()) {
                tracing::warn!(relay = slot.number, "could not send SIGTERM");
            }
        }
    }
    let deadline = Instant::now() + STOP_WAIT;
    let mut failures = Vec::new();
    for slot in slots.iter_mut() {
        let Some(mut child) = slot.child.take() else {
            continue;
        };
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(TICK).await;
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        match status {
            Some(status) if status.success() => {}
            other => failures.push(stop_failure(slot, other)),
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(CliError::Check(failures.join("\n")))
    }
}

fn stop_failure(slot: &Slot, status: Option<ExitStatus>) -> String {
    let how = match status {
        Some(status) => format!("stopped with {status}"),
        None => format!("did not stop within {STOP_WAIT:?} of SIGTERM and was killed"),
    };
    format!(
        "relay process {} {how}:\n{}",
        slot.number,
        log_tail(&slot.log)
    )
}

/// The end of a relay's log, for an error message.
fn log_tail(path: &std::path::Path) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut file) = File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
        let _ = file.read_to_end(&mut bytes);
    }
    let text = String::from_utf8_lossy(&bytes);
    if text.is_empty() {
        "(the relay wrote nothing)".to_owned()
    } else {
        text.into_owned()
    }
}
