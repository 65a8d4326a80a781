//! `outbox`: run the demo, the relay, and the operator's commands.

mod admin;
mod bench;
mod demo;
mod endpoint;
mod latency;
mod progress;
mod relay;
mod secrets;
mod target;
mod url_arg;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use target::StoreUrl;
use url_arg::UrlParser;

#[derive(Debug, Parser)]
#[command(
    name = "outbox",
    version,
    about = "Transactional outbox: record domain events with your data, deliver them reliably"
)]
struct Cli {
    /// AWS region of DynamoDB stores and AWS targets (default: AWS_REGION
    /// or the profile's region).
    #[arg(long, global = true)]
    region: Option<String>,
    /// How log lines on stderr look: `text` for people, `json` (one object
    /// a line) for a log pipeline. RUST_LOG picks what is logged.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the Order and Shipping services end to end and check the guarantees.
    Demo(demo::DemoArgs),
    /// Publish pending events from a store to a broker until stopped (SIGINT/SIGTERM).
    Relay(relay::RelayArgs),
    /// Pending, published and dead counts, and the age of the oldest pending event.
    Status {
        #[arg(long, env = "OUTBOX_STORE", hide_env_values = true, value_parser = UrlParser::<StoreUrl>::new())]
        store: StoreUrl,
        #[arg(long)]
        json: bool,
        /// Fail (exit 1) if the oldest pending event is older than this: a
        /// health check for cron or a monitoring agent.
        #[arg(long, value_parser = humantime::parse_duration)]
        max_pending_age: Option<Duration>,
        /// Fail (exit 1) if any event is dead-lettered.
        #[arg(long)]
        fail_on_dead: bool,
    },
    /// List or replay dead-lettered events.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(admin::DeadLetterCommand),
    /// Create or upgrade a store's tables (PostgreSQL); the relay and the
    /// other commands never create them.
    Migrate {
        #[arg(long, env = "OUTBOX_STORE", hide_env_values = true, value_parser = UrlParser::<StoreUrl>::new())]
        store: StoreUrl,
    },
    /// Delete published events older than a given age.
    Purge {
        #[arg(long, env = "OUTBOX_STORE", hide_env_values = true, value_parser = UrlParser::<StoreUrl>::new())]
        store: StoreUrl,
        /// Such as 7d, 12h, 30m (a unit is required).
        #[arg(long, value_parser = parse_age)]
        older_than: Duration,
    },
    /// Measure backlog drain throughput and commit-to-publish latency.
    Bench(bench::BenchArgs),
}

/// A failure the user can act on, printed without a backtrace.
#[derive(Debug)]
pub enum CliError {
    Usage(String),
    Store(outbox_core::StoreError),
    /// A store or target that cannot be named or opened as given.
    Registry(outbox_registry::RegistryError),
    /// The run finished but broke a guarantee it checks.
    Check(String),
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Usage(m) | CliError::Check(m) => f.write_str(m),
            CliError::Store(e) => write!(f, "{e}"),
            CliError::Registry(e) => write!(f, "{e}"),
        }
    }
}

impl From<outbox_core::StoreError> for CliError {
    fn from(e: outbox_core::StoreError) -> Self {
        CliError::Store(e)
    }
}

impl From<outbox_registry::RegistryError> for CliError {
    fn from(e: outbox_registry::RegistryError) -> Self {
        CliError::Registry(e)
    }
}

impl From<sqlx::Error> for CliError {
    fn from(e: sqlx::Error) -> Self {
        CliError::Store(outbox_core::StoreError::Backend(Box::new(e)))
    }
}

fn main() -> ExitCode {
    let secrets = secrets::given();
    secrets::mask_panics(secrets.clone());
    let cli = Cli::parse();
    target::set_region(cli.region.clone());
    // A relay is a service: say what it does. Other commands print their own results.
    let default_level = match cli.command {
        Command::Relay(_) => "info",
        _ => "error",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(secrets::MaskedStderr(secrets.clone()));
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Relay(args) => relay::run(args).await,
            Command::Status {
                store,
                json,
                max_pending_age,
                fail_on_dead,
            } => admin::status(&store, json, max_pending_age, fail_on_dead).await,
            Command::DeadLetters(cmd) => admin::dead_letters(cmd).await,
            Command::Migrate { store } => admin::migrate(&store).await,
            Command::Purge { store, older_than } => admin::purge(&store, older_than).await,
            Command::Bench(args) => bench::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", secrets.mask(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}

/// An age such as `7d` or `30m`: a number alone is refused (is `7` days or
/// seconds?), and so is an age longer than the calendar a store keeps.
fn parse_age(text: &str) -> Result<Duration, String> {
    const MAX_YEARS: u64 = 9_000;
    if !text.is_empty() && text.trim().bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("`{text}` has no unit: write it as 7d, 12h or 30m"));
    }
    let age = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if age > Duration::from_secs(MAX_YEARS * 365 * 24 * 3600) {
        return Err(format!(
            "`{text}` is longer than {MAX_YEARS} years, before any time a store holds"
        ));
    }
    Ok(age)
}

/// Completes on the first SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// Prints `value` as one line of JSON.
pub fn print_json(value: &impl serde::Serialize) {
    match serde_json::to_string(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: cannot render JSON: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_age_needs_a_unit_and_a_calendar() {
        assert_eq!(parse_age("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_age("0s"), Ok(Duration::ZERO));
        for (text, says) in [
            ("0", "has no unit"),
            ("7", "has no unit"),
            ("1000000y", "longer than 9000 years"),
            ("", ""),
            ("7 fortnights", ""),
        ] {
            let err = parse_age(text).expect_err(text);
            assert!(err.contains(says), "{text}: {err}");
        }
    }
}
