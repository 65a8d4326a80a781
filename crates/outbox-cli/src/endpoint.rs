//! The relay's HTTP endpoint (`outbox relay --metrics-addr`): Prometheus
//! metrics on `/metrics`, liveness on `/healthz`, readiness on `/readyz`.
//!
//! The store's own figures (pending count, oldest pending age, dead
//! letters) come from a query every `--stats-every`, not from each scrape,
//! so how often Prometheus scrapes never adds load to the store.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use outbox_core::metrics::prometheus;
use outbox_core::{OutboxStats, RelayMetrics};
use tokio::net::TcpListener;

/// What the relay loop last learned about the store and the target, shared
/// with the endpoint.
#[derive(Debug, Default)]
pub struct Health {
    /// The latest successful stats query.
    stats: Option<OutboxStats>,
    /// When `stats` was read.
    stats_at: Option<DateTime<Utc>>,
    /// Why the latest stats query failed, if it did.
    store_error: Option<String>,
    /// Set while the target is down: since when, and its last error.
    outage: Option<(DateTime<Utc>, String)>,
}

impl Health {
    pub fn stats_read(&mut self, result: Result<OutboxStats, String>) {
        match result {
            Ok(stats) => {
                self.stats = Some(stats);
                self.stats_at = Some(Utc::now());
                self.store_error = None;
            }
            Err(e) => self.store_error = Some(e),
        }
    }

    pub fn outage(&mut self, outage: Option<(DateTime<Utc>, String)>) {
        self.outage = outage;
    }

    /// Why the relay is not ready, if it is not.
    fn not_ready(&self) -> Option<String> {
        if let Some(e) = &self.store_error {
            return Some(format!("store unavailable: {e}"));
        }
        if self.stats.is_none() {
            return Some("store not read yet".to_owned());
        }
        self.outage
            .as_ref()
            .map(|(since, e)| format!("target unavailable since {}: {e}", since.to_rfc3339()))
    }
}

/// Everything the endpoint reads.
#[derive(Debug, Clone)]
pub struct Shared {
    pub metrics: Arc<RelayMetrics>,
    pub health: Arc<Mutex<Health>>,
}

impl Shared {
    pub fn new(metrics: Arc<RelayMetrics>) -> Self {
        Self {
            metrics,
            health: Arc::default(),
        }
    }

    pub fn update(&self, change: impl FnOnce(&mut Health)) {
        // A panic elsewhere while holding the lock leaves plain data behind:
        // keep serving it.
        change(&mut self.health.lock().unwrap_or_else(PoisonError::into_inner));
    }

    fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        self.metrics.write_prometheus(&mut out);
        let health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        let up = |b: bool| if b { 1.0 } else { 0.0 };
        prometheus::gauge(
            &mut out,
            "outbox_target_up",
            "1 unless the relay sees the target as a whole down.",
            up(health.outage.is_none()),
        );
        prometheus::gauge(
            &mut out,
            "outbox_store_up",
            "1 if the latest stats query of the store succeeded.",
            up(health.store_error.is_none() && health.stats.is_some()),
        );
        if let (Some(stats), Some(at)) = (&health.stats, health.stats_at) {
            let oldest_age = stats
                .oldest_pending_at
                .map_or(0.0, |t| (at - t).to_std().unwrap_or_default().as_secs_f64());
            let gauges = [
                ("outbox_pending_events", "Events waiting to be published.", stats.pending as f64),
                ("outbox_oldest_pending_age_seconds", "Age of the oldest pending event when the store was read (0 with none).", oldest_age),
                ("outbox_dead_letter_events", "Events dead-lettered and not replayed or skipped.", stats.dead as f64),
                ("outbox_published_events", "Published events kept by the store (until purged).", stats.published as f64),
                ("outbox_lost_events", "Events known lost before a relay could read them (anything but 0 needs a person).", stats.lost as f64),
                ("outbox_stats_timestamp_seconds", "When the store's figures were read (Unix time).", at.timestamp_millis() as f64 / 1000.0),
            ];
            for (name, help, value) in gauges {
                prometheus::gauge(&mut out, name, help, value);
            }
        }
        out
    }

    fn respond(&self, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET and HEAD\n".to_owned(),
            );
        }
        match req.uri().path() {
            "/metrics" => {
                let mut response = text(StatusCode::OK, self.render());
                response.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(prometheus::CONTENT_TYPE),
                );
                response
            }
            // The process answers, so its relay loop and runtime are alive.
            "/healthz" => text(StatusCode::OK, "ok\n".to_owned()),
            "/readyz" => {
                let health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
                match health.not_ready() {
                    None => text(StatusCode::OK, "ready\n".to_owned()),
                    Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                }
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /healthz or /readyz\n".to_owned(),
            ),
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Binds the address now, so a taken port fails the relay's start.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, crate::CliError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| crate::CliError::Usage(format!("--metrics-addr {addr}: cannot listen: {e}")))
}

/// A scrape or probe that takes longer than this is cut off.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves until the future is dropped.
pub async fn serve(listener: TcpListener, shared: Shared) -> Infallible {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, say: wait rather than spin.
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let response = shared.respond(&req);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                Ok(Ok(())) | Err(_) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "metrics endpoint: connection error"),
            }
        });
    }
}
