#![doc = "The Orders example end to end on local emulators: each function runs as the binary that deploys, behind a Lambda Runtime API emulator, invoked by pollers that behave as the template's event source mappings, with injected faults. See `scripts/e2e`."]

pub mod esm;
pub mod events;
pub mod faults;
pub mod front;
pub mod http;
pub mod queue;
pub mod run;
pub mod runtime;
pub mod setup;
pub mod stream;
pub mod template;
pub mod workload;

pub use run::{run, RunConfig, Summary};

/// Why a run could not be carried out (as opposed to a run whose checks
/// failed, which is a [`Summary`] with problems).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The emulators, resources, binaries or settings are not usable.
    #[error("setup: {0}")]
    Setup(String),
    /// The tables or queues could not be read for the check.
    #[error("check: {0}")]
    Check(String),
    /// Building the function binaries failed.
    #[error("build: {0}")]
    Build(String),
}

/// Builds the function binaries into `bin_dir` (a profile directory of a
/// target directory, such as `target/debug`), in that profile, with the
/// cargo at `cargo`: what the test runs before a run.
///
/// It builds what `cargo test --workspace` builds (the packages' binaries
/// come with their integration tests), so under the README's test command
/// this is a no-op, and a build of only some packages never recompiles the
/// shared dependencies with another feature set.
pub fn build_functions(cargo: &std::path::Path, bin_dir: &std::path::Path) -> Result<(), Error> {
    let profile = bin_dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Build(format!("{}: not a profile directory", bin_dir.display())))?;
    let target_dir = bin_dir.parent().ok_or_else(|| {
        Error::Build(format!(
            "{}: no target directory above it",
            bin_dir.display()
        ))
    })?;
    let mut command = std::process::Command::new(cargo);
    command
        .args(["test", "--workspace", "--no-run"])
        .env("CARGO_TARGET_DIR", target_dir);
    match profile {
        "debug" => {}
        "release" => {
            command.arg("--release");
        }
        other => {
            command.args(["--profile", other]);
        }
    }
    let status = command
        .status()
        .map_err(|e| Error::Build(format!("cannot run {}: {e}", cargo.display())))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Build(format!(
            "cargo build of the functions failed ({status})"
        )))
    }
}
