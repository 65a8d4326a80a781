use std::io::Write;

use crate::cloudevents;
use crate::error::PublishError;
use crate::publish::{fail_all, PublishRequest, PublishResult, Publisher, DEFAULT_SOURCE};

/// Writes each event as one CloudEvent JSON line on standard output.
#[derive(Debug, Clone)]
pub struct StdoutPublisher {
    source: String,
}

impl StdoutPublisher {
    pub fn new(source: impl Into<String>) -> Self {
        Self {
            source: source.into(),
        }
    }
}

impl Default for StdoutPublisher {
    fn default() -> Self {
        Self::new(DEFAULT_SOURCE)
    }
}

impl Publisher for StdoutPublisher {
    async fn publish(&self, request: PublishRequest<'_>) -> Vec<PublishResult> {
        let mut lines = String::new();
        for event in request.events {
            lines.push_str(&cloudevents::to_json(event, &self.source));
            lines.push('\n');
        }
        // A blocking write, off the async workers: a reader that stops
        // reading must stall only this call (which the relay's publish
        // timeout then gives up on), not the runtime.
        let written = tokio::task::spawn_blocking(move || {
            let mut out = std::io::stdout().lock();
            out.write_all(lines.as_bytes()).and_then(|()| out.flush())
        })
        .await;
        match written {
            Ok(Ok(())) => vec![Ok(()); request.events.len()],
            // A closed pipe will not reopen by itself, but the operator may fix it.
            Ok(Err(e)) => fail_all(&request, PublishError::transient(format!("stdout: {e}"))),
            Err(e) => fail_all(
                &request,
                PublishError::transient(format!("stdout writer: {e}")),
            ),
        }
    }
}
