//! Fault injection between `publish-events` and EventBridge: an HTTP proxy
//! in front of the emulator that, for chosen events, withholds their
//! entries from a `PutEvents` call and answers them with a per-entry error
//! (`FailedEntryCount` > 0, `ErrorCode`), forwarding the rest. The call as a
//! whole succeeds, which is exactly the case a publisher must read entry by
//! entry. Every other request passes through untouched.
//!
//! Which events fail is decided by the order in which the proxy first sees
//! them, so a run is repeatable: every `flaky_every`th event fails once (the
//! function's own retry absorbs it), every `stubborn_every`th fails
//! `stubborn_failures` times in a row (more than one invocation retries, so
//! the function reports the record failed and the stream mapping retries
//! the batch from it).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::http::{self, Body};

/// Which events fail, and how often.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultPlan {
    /// Every n-th new event fails once (0: none).
    pub flaky_every: u64,
    /// Every n-th new event fails `stubborn_failures` times (0: none).
    pub stubborn_every: u64,
    pub stubborn_failures: u32,
}

impl Default for FaultPlan {
    fn default() -> Self {
        Self {
            flaky_every: 17,
            stubborn_every: 97,
            // publish-events retries an entry 3 times within an invocation
            // (OUTBOX_ENTRY_RETRIES' default): a fifth failure outlasts one
            // invocation, so the record goes back to the stream mapping.
            stubborn_failures: 5,
        }
    }
}

/// What the proxy did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FaultStats {
    pub put_events_calls: u64,
    pub entries_forwarded: u64,
    /// Entries answered with an error instead of being forwarded.
    pub entries_failed: u64,
    /// Distinct events that were failed at least once.
    pub events_failed: u64,
}

#[derive(Debug, Default)]
struct State {
    /// Event id -> failures still to inject.
    budget: HashMap<String, u32>,
    seen: u64,
    stats: FaultStats,
}

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    plan: FaultPlan,
    state: Mutex<State>,
}

/// The running proxy.
#[derive(Debug)]
pub struct EventBridgeProxy {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: JoinHandle<()>,
}

impl Drop for EventBridgeProxy {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl EventBridgeProxy {
    /// Starts a proxy to `upstream` (the EventBridge emulator) on a loopback
    /// port.
    pub async fn start(upstream: SocketAddr, plan: FaultPlan) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            plan,
            state: Mutex::new(State::default()),
        });
        let server = {
            let shared = shared.clone();
            http::serve(listener, move |req| proxy(shared.clone(), req))
        };
        Ok(Self {
            shared,
            addr,
            server,
        })
    }

    /// The endpoint URL to give the function.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stats(&self) -> FaultStats {
        lock(&self.shared.state).stats.clone()
    }
}

/// The CloudEvent id inside an entry's `Detail`, which names the event.
fn entry_event_id(entry: &Value) -> Option<String> {
    let detail: Value = serde_json::from_str(entry.get("Detail")?.as_str()?).ok()?;
    detail.get("id")?.as_str().map(str::to_owned)
}

impl State {
    /// Whether this attempt at the entry should fail.
    fn should_fail(&mut self, plan: &FaultPlan, id: &str) -> bool {
        if !self.budget.contains_key(id) {
            self.seen = self.seen.saturating_add(1);
            let n = self.seen;
            let failures = if plan.stubborn_every > 0 && n.is_multiple_of(plan.stubborn_every) {
                plan.stubborn_failures
            } else if plan.flaky_every > 0 && n.is_multiple_of(plan.flaky_every) {
                1
            } else {
                0
            };
            if failures > 0 {
                self.stats.events_failed = self.stats.events_failed.saturating_add(1);
            }
            self.budget.insert(id.to_owned(), failures);
        }
        match self.budget.get_mut(id) {
            Some(left) if *left > 0 => {
                *left -= 1;
                true
            }
            _ => false,
        }
    }
}

/// Splits a PutEvents body: the entries to forward, and for each original
/// position either the index among the forwarded or `None` (failed here).
fn split(state: &mut State, plan: &FaultPlan, body: &Value) -> (Vec<Value>, Vec<Option<usize>>) {
    let entries = body
        .get("Entries")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut forward = Vec::new();
    let mut positions = Vec::new();
    for entry in entries {
        let fail = entry_event_id(&entry).is_some_and(|id| state.should_fail(plan, &id));
        if fail {
            positions.push(None);
        } else {
            positions.push(Some(forward.len()));
            forward.push(entry);
        }
    }
    (forward, positions)
}

/// The merged response: upstream's entries where forwarded, an injected
/// error where not.
fn merge(positions: &[Option<usize>], upstream: &Value) -> Value {
    let upstream_entries = upstream
        .get("Entries")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut failed = 0u64;
    let entries: Vec<Value> = positions
        .iter()
        .map(|p| {
            let entry = match p {
                Some(i) => upstream_entries.get(*i).cloned().unwrap_or_else(|| {
                    json!({"ErrorCode": "InternalFailure", "ErrorMessage": "no result from upstream"})
                }),
                None => json!({
                    "ErrorCode": "ThrottlingException",
                    "ErrorMessage": "Rate exceeded (injected by the local end-to-end run)"
                }),
            };
            if entry.get("ErrorCode").is_some() {
                failed = failed.saturating_add(1);
            }
            entry
        })
        .collect();
    json!({"FailedEntryCount": failed, "Entries": entries})
}

async fn proxy(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = match http::read_body(body).await {
        Ok(b) => b,
        Err(e) => return http::respond(StatusCode::BAD_REQUEST, "text/plain", e),
    };
    let is_put_events = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.ends_with(".PutEvents"));
    let parsed: Option<Value> = if is_put_events {
        serde_json::from_slice(&body).ok()
    } else {
        None
    };
    let Some(mut request_json) = parsed else {
        return forward(&shared, parts, body).await;
    };
    let (entries, positions) = {
        let mut state = lock(&shared.state);
        let (entries, positions) = split(&mut state, &shared.plan, &request_json);
        state.stats.put_events_calls = state.stats.put_events_calls.saturating_add(1);
        state.stats.entries_forwarded = state
            .stats
            .entries_forwarded
            .saturating_add(entries.len() as u64);
        let failed = positions.iter().filter(|p| p.is_none()).count() as u64;
        state.stats.entries_failed = state.stats.entries_failed.saturating_add(failed);
        (entries, positions)
    };
    if positions.iter().all(Option::is_some) {
        return forward(&shared, parts, body).await;
    }
    let upstream = if entries.is_empty() {
        json!({"FailedEntryCount": 0, "Entries": []})
    } else {
        request_json["Entries"] = Value::Array(entries);
        let response = forward(
            &shared,
            parts,
            Bytes::from(request_json.to_string().into_bytes()),
        )
        .await;
        if response.status() != StatusCode::OK {
            // The call failed as a whole: so it does for the caller.
            return response;
        }
        let bytes = match http_body_util::BodyExt::collect(response.into_body()).await {
            Ok(c) => c.to_bytes(),
            Err(never) => match never {},
        };
        match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => {
                return http::respond(
                    StatusCode::BAD_GATEWAY,
                    "text/plain",
                    format!("upstream PutEvents answer is not JSON: {e}"),
                )
            }
        }
    };
    http::respond(
        StatusCode::OK,
        "application/x-amz-json-1.1",
        merge(&positions, &upstream).to_string(),
    )
}

/// Sends the request on to the emulator as it came, with `body`.
async fn forward(
    shared: &Shared,
    parts: hyper::http::request::Parts,
    body: Bytes,
) -> Response<Body> {
    let mut builder = Request::builder().method(parts.method).uri(
        parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".to_owned()),
    );
    for (name, value) in &parts.headers {
        if name != hyper::header::CONTENT_LENGTH && name != hyper::header::HOST {
            builder = builder.header(name, value);
        }
    }
    let request = builder
        .header(hyper::header::HOST, shared.upstream.to_string())
        .header(hyper::header::CONTENT_LENGTH, body.len())
        .body(http_body_util::Full::new(body));
    let request = match request {
        Ok(r) => r,
        Err(e) => return http::respond(StatusCode::BAD_GATEWAY, "text/plain", e.to_string()),
    };
    match http::send(shared.upstream, request).await {
        Ok(response) => {
            let (parts, bytes) = response.into_parts();
            let mut out = Response::from_parts(parts, http_body_util::Full::new(bytes));
            // hyper sets the length of what it sends.
            out.headers_mut().remove(hyper::header::TRANSFER_ENCODING);
            out
        }
        Err(e) => http::respond(StatusCode::BAD_GATEWAY, "text/plain", e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> Value {
        json!({"Source": "s", "DetailType": "T", "Detail": json!({"id": id}).to_string()})
    }

    #[test]
    fn fails_chosen_events_and_merges_in_order() {
        let plan = FaultPlan {
            flaky_every: 2,
            stubborn_every: 0,
            stubborn_failures: 0,
        };
        let mut state = State::default();
        let body = json!({"Entries": [entry("a"), entry("b"), entry("c"), entry("d")]});
        let (forward, positions) = split(&mut state, &plan, &body);
        assert_eq!(positions, vec![Some(0), None, Some(1), None]);
        assert_eq!(forward.len(), 2);
        let merged = merge(
            &positions,
            &json!({"FailedEntryCount": 0, "Entries": [{"EventId": "1"}, {"EventId": "2"}]}),
        );
        assert_eq!(merged["FailedEntryCount"], 2);
        assert_eq!(merged["Entries"][0]["EventId"], "1");
        assert_eq!(merged["Entries"][1]["ErrorCode"], "ThrottlingException");
        assert_eq!(merged["Entries"][2]["EventId"], "2");
        // A flaky event fails once: its retry goes through.
        let (_, positions) = split(&mut state, &plan, &json!({"Entries": [entry("b")]}));
        assert_eq!(positions, vec![Some(0)]);
        assert_eq!(state.stats.events_failed, 2);
    }

    #[test]
    fn stubborn_events_fail_repeatedly() {
        let plan = FaultPlan {
            flaky_every: 0,
            stubborn_every: 1,
            stubborn_failures: 3,
        };
        let mut state = State::default();
        let body = json!({"Entries": [entry("x")]});
        for _ in 0..3 {
            assert_eq!(split(&mut state, &plan, &body).1, vec![None]);
        }
        assert_eq!(split(&mut state, &plan, &body).1, vec![Some(0)]);
        // Entries without a CloudEvent are forwarded as they are.
        let odd = json!({"Entries": [{"Detail": "not json"}]});
        assert_eq!(split(&mut state, &plan, &odd).1, vec![Some(0)]);
    }
}
