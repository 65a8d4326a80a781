//! Runs one decoder over generated inputs: each input in `catch_unwind`,
//! timed, watched for hangs, its verdict checked; failing inputs written
//! to files with the command that reproduces them.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use fastrand::Rng;

/// What a decoder did with one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    /// Refused with a clear error.
    Refused,
    /// Something the decoder must never do: a refusal that does not say
    /// what is wrong, an accepted input that does not round-trip, a broken
    /// invariant. (Panics and hangs are caught by the runner.)
    Broken(String),
}

/// A decoder of outside data and the inputs it is fuzzed with.
pub trait Target: Sync {
    type Input;
    /// The name on the command line (`--only`).
    fn name(&self) -> &'static str;
    /// One input, drawn from `rng` alone (so the seed and the input's index
    /// rebuild it).
    fn generate(&self, rng: &mut Rng) -> Self::Input;
    /// Decodes the input and checks what came out.
    fn check(&self, input: &Self::Input) -> Verdict;
    /// The input as written to a failure file.
    fn dump(&self, input: &Self::Input) -> Vec<u8>;
}

/// Checks that a refusal says what was wrong: a non-empty message naming
/// one of `names` (a field, an attribute, a limit) or a position in the
/// input (`line 1 column 5`, from the JSON parser).
pub fn refusal(message: &str, names: &[&str]) -> Verdict {
    if message.trim().is_empty() {
        return Verdict::Broken("refused with an empty message".to_owned());
    }
    let names_one = names.iter().any(|n| message.contains(n));
    let has_position = message.contains(" line ") && message.contains(" column ");
    if names_one || has_position {
        Verdict::Refused
    } else {
        Verdict::Broken(format!(
            "the refusal names no field, limit or position: {message}"
        ))
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    pub inputs: u64,
    /// Index of the first input (to rerun part of a run).
    pub start: u64,
    /// Print each input's index before running it (to find an input that
    /// kills the process, such as a stack overflow).
    pub trace: bool,
    /// Where failing inputs are written.
    pub out: PathBuf,
    /// An input slower than this is reported (and kept) as slow.
    pub slow: Duration,
    /// An input still running after this is a hang: the run stops.
    pub hang: Duration,
    /// Failing inputs kept as files per decoder; the rest are counted.
    pub keep: usize,
    /// Print progress to stderr.
    pub progress: bool,
    /// Stop starting inputs after this long (the stats say how many ran).
    pub time_limit: Option<Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            seed: 1,
            inputs: 1_000,
            start: 0,
            trace: false,
            out: PathBuf::from("target/fuzz"),
            slow: Duration::from_millis(250),
            hang: Duration::from_secs(30),
            keep: 20,
            progress: false,
            time_limit: None,
        }
    }
}

/// What a run of one decoder found.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub name: &'static str,
    pub inputs: u64,
    pub accepted: u64,
    pub refused: u64,
    pub panics: u64,
    pub broken: u64,
    pub slow: u64,
    pub slowest: Duration,
    pub wall: Duration,
    /// One line per failing input kept (first ones only).
    pub failures: Vec<String>,
}

impl Stats {
    pub fn failed(&self) -> u64 {
        self.panics + self.broken
    }
}

/// The seed of input `index` of decoder `name` in a run seeded with `seed`.
pub fn input_seed(seed: u64, name: &str, index: u64) -> u64 {
    let name_hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    splitmix(splitmix(seed ^ name_hash).wrapping_add(index))
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

thread_local! {
    /// Set while an input runs: the panic hook records here instead of printing.
    static CAUGHT: RefCell<Option<Option<String>>> = const { RefCell::new(None) };
}

/// Installs (once) a panic hook that records the panics of inputs with
/// their location and stays quiet; other panics print as usual.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let recorded = CAUGHT.with(|c| {
                let mut c = c.borrow_mut();
                match c.as_mut() {
                    Some(slot) => {
                        *slot = Some(info.to_string());
                        true
                    }
                    None => false,
                }
            });
            if !recorded {
                default(info);
            }
        }));
    });
}

/// The command that reruns one input.
pub fn reproduce(name: &str, seed: u64, index: u64) -> String {
    format!("scripts/fuzz --only {name} --seed {seed} --start {index} --inputs 1")
}

/// Runs `target` over `options.inputs` inputs.
pub fn run<T: Target>(target: &T, options: &Options) -> Stats {
    install_panic_hook();
    let name = target.name();
    let mut stats = Stats {
        name,
        ..Stats::default()
    };
    let started = Instant::now();
    // The watchdog: the input running and since when (ms after `started`, +1).
    let current = Arc::new(AtomicU64::new(0));
    let since = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let end = options.start.saturating_add(options.inputs);
    std::thread::scope(|scope| {
        {
            let (current, since, done) = (current.clone(), since.clone(), done.clone());
            let hang_ms = u64::try_from(options.hang.as_millis()).unwrap_or(u64::MAX);
            scope.spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                    let at = since.load(Ordering::Relaxed);
                    let now = elapsed_ms(started).saturating_add(1);
                    if at != 0 && now.saturating_sub(at) > hang_ms {
                        let index = current.load(Ordering::Relaxed);
                        let mut rng = Rng::with_seed(input_seed(options.seed, name, index));
                        let input = target.generate(&mut rng);
                        let what = format!("hang: still running after {:?}", options.hang);
                        let file = keep_input(options, name, index, &what, &target.dump(&input));
                        eprintln!(
                            "{name}: input {index} hangs ({what}); input in {file}; reproduce: {}",
                            reproduce(name, options.seed, index)
                        );
                        std::process::exit(3);
                    }
                }
            });
        }
        let step = (options.inputs / 10).max(1);
        for index in options.start..end {
            if options
                .time_limit
                .is_some_and(|limit| started.elapsed() >= limit)
            {
                eprintln!("{name}: time limit reached after {} inputs", stats.inputs);
                break;
            }
            let mut rng = Rng::with_seed(input_seed(options.seed, name, index));
            let input = target.generate(&mut rng);
            if options.trace {
                eprintln!("{name}: input {index}");
            }
            current.store(index, Ordering::Relaxed);
            since.store(elapsed_ms(started).saturating_add(1), Ordering::Relaxed);
            CAUGHT.with(|c| *c.borrow_mut() = Some(None));
            let t0 = Instant::now();
            let outcome = panic::catch_unwind(AssertUnwindSafe(|| target.check(&input)));
            let took = t0.elapsed();
            since.store(0, Ordering::Relaxed);
            let panic_message = CAUGHT.with(|c| c.borrow_mut().take()).flatten();
            stats.inputs += 1;
            stats.slowest = stats.slowest.max(took);
            let failure = match outcome {
                Ok(Verdict::Accepted) => {
                    stats.accepted += 1;
                    None
                }
                Ok(Verdict::Refused) => {
                    stats.refused += 1;
                    None
                }
                Ok(Verdict::Broken(why)) => {
                    stats.broken += 1;
                    Some(why)
                }
                Err(_) => {
                    stats.panics += 1;
                    Some(format!(
                        "panic: {}",
                        panic_message.unwrap_or_else(|| "(no message)".to_owned())
                    ))
                }
            };
            if took > options.slow {
                stats.slow += 1;
                if stats.slow <= 3 {
                    let what = format!("slow: {took:?}");
                    let file = keep_input(options, name, index, &what, &target.dump(&input));
                    eprintln!("{name}: input {index} is slow ({took:?}); input in {file}");
                }
            }
            if let Some(why) = failure {
                let kept = stats.failures.len() < options.keep;
                let file = if kept {
                    keep_input(options, name, index, &why, &target.dump(&input))
                } else {
                    "(not kept)".to_owned()
                };
                let line = format!(
                    "{name} input {index}: {}; input in {file}; reproduce: {}",
                    shorten(&why, 400),
                    reproduce(name, options.seed, index)
                );
                if kept {
                    eprintln!("{line}");
                    stats.failures.push(line);
                }
            }
            if options.progress && (index + 1 - options.start).is_multiple_of(step) {
                eprintln!(
                    "{name}: {} of {} inputs ({:.0?})",
                    index + 1 - options.start,
                    options.inputs,
                    started.elapsed()
                );
            }
        }
        done.store(true, Ordering::Relaxed);
    });
    stats.wall = started.elapsed();
    stats
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn shorten(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Writes the input and why it failed; returns the input file's path.
fn keep_input(options: &Options, name: &str, index: u64, why: &str, input: &[u8]) -> String {
    let base = options
        .out
        .join(format!("{name}-seed{}-input{index}", options.seed));
    let input_path = base.with_extension("input");
    let note_path = base.with_extension("txt");
    let mut note = String::new();
    let _ = writeln!(note, "{why}");
    let _ = writeln!(note, "reproduce: {}", reproduce(name, options.seed, index));
    let written = std::fs::create_dir_all(&options.out)
        .and_then(|()| std::fs::write(&input_path, input))
        .and_then(|()| std::fs::write(&note_path, note));
    match written {
        Ok(()) => input_path.display().to_string(),
        Err(e) => format!("(could not write {}: {e})", input_path.display()),
    }
}
