//! `outbox-fuzz`: runs the decoders over generated inputs (see `scripts/fuzz`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use outbox_fuzz::{run_named, Options, Stats, NAMES};

const USAGE: &str = "usage: outbox-fuzz [--inputs N] [--seed S] [--only NAME[,NAME..]] \
[--start I] [--trace] [--out DIR] [--slow-ms MS] [--hang-secs S] [--max-secs S]

  --inputs N     inputs per decoder (default 1000000)
  --seed S       the run's seed (default: from the clock; printed)
  --only NAMES   decoders to run, comma-separated (default: all)
  --start I      index of the first input (rerun part of a run)
  --trace        print each input's index before running it
  --out DIR      where failing inputs are written (default target/fuzz)
  --slow-ms MS   report inputs slower than this (default 250)
  --hang-secs S  an input running longer is a hang (default 30)
  --max-secs S   stop each decoder after S seconds (reports the inputs run)";

fn parse_args() -> Result<(Options, Vec<String>), String> {
    let mut options = Options {
        inputs: 1_000_000,
        seed: u64::try_from(chrono::Utc::now().timestamp_micros()).unwrap_or(1),
        progress: true,
        ..Options::default()
    };
    let mut only: Vec<String> = NAMES.iter().map(|n| (*n).to_owned()).collect();
    let mut args = std::env::args().skip(1);
    let number = |flag: &str, v: Option<String>| -> Result<u64, String> {
        let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
        v.parse()
            .map_err(|e| format!("{flag} `{v}` is not a whole number: {e}"))
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--inputs" => options.inputs = number("--inputs", args.next())?,
            "--seed" => options.seed = number("--seed", args.next())?,
            "--start" => options.start = number("--start", args.next())?,
            "--slow-ms" => options.slow = Duration::from_millis(number("--slow-ms", args.next())?),
            "--hang-secs" => {
                options.hang = Duration::from_secs(number("--hang-secs", args.next())?)
            }
            "--max-secs" => {
                options.time_limit = Some(Duration::from_secs(number("--max-secs", args.next())?))
            }
            "--trace" => options.trace = true,
            "--out" => {
                options.out = PathBuf::from(args.next().ok_or("--out needs a value")?);
            }
            "--only" => {
                let list = args.next().ok_or("--only needs a value")?;
                only = list.split(',').map(str::to_owned).collect();
                if let Some(unknown) = only.iter().find(|n| !NAMES.contains(&n.as_str())) {
                    return Err(format!(
                        "no decoder named `{unknown}`; known: {}",
                        NAMES.join(", ")
                    ));
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    Ok((options, only))
}

fn main() -> ExitCode {
    let (options, only) = match parse_args() {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "seed {} ({} inputs per decoder from input {}); rerun with --seed {}",
        options.seed, options.inputs, options.start, options.seed
    );
    let mut all: Vec<Stats> = Vec::new();
    for name in &only {
        // A thread with the stack Lambda's and tokio's threads get
        // (2 MiB), so a recursion too deep for them shows here too.
        let worker = {
            let options = options.clone();
            let name = name.clone();
            std::thread::Builder::new()
                .name(name.clone())
                .stack_size(2 * 1024 * 1024)
                .spawn(move || run_named(&name, &options))
        };
        let result = match worker {
            Ok(handle) => handle
                .join()
                .unwrap_or_else(|_| Err("the run itself panicked".to_owned())),
            Err(e) => Err(format!("cannot start a thread: {e}")),
        };
        match result {
            Ok(stats) => {
                println!("{}", line(&stats));
                all.push(stats);
            }
            Err(e) => {
                eprintln!("{name}: {e}");
                return ExitCode::from(2);
            }
        }
    }
    println!();
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>7} {:>7} {:>6} {:>10} {:>9}",
        "decoder", "inputs", "accepted", "refused", "panics", "broken", "slow", "slowest", "wall"
    );
    for s in &all {
        println!(
            "{:<22} {:>10} {:>10} {:>10} {:>7} {:>7} {:>6} {:>10.1?} {:>9.1?}",
            s.name, s.inputs, s.accepted, s.refused, s.panics, s.broken, s.slow, s.slowest, s.wall
        );
    }
    let failed: u64 = all.iter().map(Stats::failed).sum();
    if failed > 0 {
        println!("\n{failed} failing inputs; see {}", options.out.display());
        for s in &all {
            for f in &s.failures {
                println!("  {f}");
            }
        }
        return ExitCode::from(1);
    }
    println!("\nno failures (seed {})", options.seed);
    ExitCode::SUCCESS
}

fn line(s: &Stats) -> String {
    format!(
        "{}: {} inputs, {} accepted, {} refused, {} panics, {} broken, {} slow (slowest {:.1?}), {:.1?}",
        s.name, s.inputs, s.accepted, s.refused, s.panics, s.broken, s.slow, s.slowest, s.wall
    )
}
