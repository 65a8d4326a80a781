//! `orders-e2e`: the Orders example end to end on the local emulators.
//! `scripts/e2e` builds the functions, starts the emulators and runs this.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use orders_e2e::{run, RunConfig};
use tracing_subscriber::EnvFilter;

/// Runs the Orders application end to end: the functions as the binaries
/// that deploy, behind a Lambda Runtime API emulator, fed by local event
/// source mappings, with injected PutEvents failures and killed functions;
/// then checks that Shipping saw each event once and in order.
#[derive(Debug, Parser)]
#[command(name = "orders-e2e")]
struct Args {
    /// Orders to send through the HTTP API.
    #[arg(long, default_value_t = 300)]
    orders: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Where the function binaries are (default: beside this program).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The SAM template the event source mappings are read from.
    #[arg(long, default_value = "infra/template.yaml")]
    template: PathBuf,
    /// Where the functions' logs go (default: BIN_DIR/e2e-logs).
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Inject no PutEvents failures and kill no function.
    #[arg(long)]
    no_faults: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let bin_dir = match args.bin_dir.clone().or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(PathBuf::from))
    }) {
        Some(d) => d,
        None => {
            eprintln!("orders-e2e: cannot tell where the function binaries are; pass --bin-dir");
            return ExitCode::from(2);
        }
    };
    let log_dir = args
        .log_dir
        .clone()
        .unwrap_or_else(|| bin_dir.join("e2e-logs"));
    let mut config = RunConfig::new(args.orders, bin_dir, args.template.clone(), log_dir);
    if args.no_faults {
        config.faults = orders_e2e::faults::FaultPlan {
            flaky_every: 0,
            stubborn_every: 0,
            stubborn_failures: 0,
        };
        config.kill_publish_events_at = None;
        config.kill_shipping_at = None;
    }
    match run(&config).await {
        Ok(summary) => {
            if args.json {
                match serde_json::to_string_pretty(&summary) {
                    Ok(json) => println!("{json}"),
                    Err(e) => eprintln!("orders-e2e: cannot write the summary: {e}"),
                }
            } else {
                print!("{}", summary.render());
            }
            if summary.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("orders-e2e: {e}");
            ExitCode::from(2)
        }
    }
}
