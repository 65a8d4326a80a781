//! The net beneath the redaction: passwords this process was given (in a
//! store or target URL, as an argument or in the environment) are masked
//! in everything it prints that it did not word itself (a driver's error,
//! a log line, a panic).

use std::io::{self, Write};
use std::sync::Arc;

use outbox_core::secret::Secrets;
use tracing_subscriber::fmt::MakeWriter;

/// The environment variables that may hold a store or target URL.
const URL_VARIABLES: &[&str] = &["OUTBOX_STORE", "OUTBOX_TO"];

/// The passwords of every URL among the arguments and the URL variables.
pub fn given() -> Arc<Secrets> {
    let mut secrets = Secrets::new();
    for arg in std::env::args_os().skip(1) {
        // `--store=URL` as well as `--store URL`: the password sits between
        // the first `:` after `://` and the last `@` either way.
        secrets.add_url(&arg.to_string_lossy());
    }
    for name in URL_VARIABLES {
        if let Some(url) = std::env::var_os(name) {
            secrets.add_url(&url.to_string_lossy());
        }
    }
    Arc::new(secrets)
}

/// Panics print through the mask too.
pub fn mask_panics(secrets: Arc<Secrets>) {
    std::panic::set_hook(Box::new(move |info| {
        eprintln!("{}", secrets.mask(&info.to_string()));
    }));
}

/// Standard error for log lines, masked. The formatter writes each event
/// in one call, so a secret is never split across two writes.
#[derive(Clone)]
pub struct MaskedStderr(pub Arc<Secrets>);

impl<'a> MakeWriter<'a> for MaskedStderr {
    type Writer = MaskedWriter;

    fn make_writer(&'a self) -> MaskedWriter {
        MaskedWriter(self.0.clone())
    }
}

pub struct MaskedWriter(Arc<Secrets>);

impl Write for MaskedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut stderr = io::stderr().lock();
        if self.0.is_empty() {
            stderr.write_all(buf)?;
        } else {
            stderr.write_all(self.0.mask(&String::from_utf8_lossy(buf)).as_bytes())?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}
