//! The traffic of a run: orders created, paid and cancelled through the
//! front door, plus requests the API must refuse, each with the answer it
//! must get. What the API accepted decides what Shipping must end up with.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Bytes;
use hyper::Request;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::http;

/// Where an order must end up, as the API's answers say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// The order's status after its last accepted command.
    pub status: String,
    /// Its version: the number of events it wrote.
    pub version: u64,
}

/// A request whose answer was not the one expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub request: String,
    pub expected: u16,
    pub got: u16,
    pub body: String,
}

/// What the traffic did.
#[derive(Debug, Default)]
pub struct Traffic {
    pub expected: HashMap<String, Expected>,
    pub requests: u64,
    /// Requests that were meant to be refused (400, 404, 409) and were.
    pub refusals_checked: u64,
    pub mismatches: Vec<Mismatch>,
}

/// The plan of order number `i`: which commands follow its creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Created and left so.
    Create,
    Pay,
    Cancel,
    /// Cancelled, then a payment (refused: 409) and a second cancel (409).
    CancelThenRefused,
    /// Paid with the right `If-Match`, then a cancel with a stale one (409).
    PayThenStale,
}

impl Plan {
    pub fn of(i: usize) -> Self {
        match i % 10 {
            0..=3 => Plan::Pay,
            4..=5 => Plan::Cancel,
            6 => Plan::Create,
            7 => Plan::CancelThenRefused,
            8 => Plan::PayThenStale,
            _ => Plan::Pay,
        }
    }
}

/// One answer: status and JSON body (`Null` when the body is not JSON).
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    if_match: Option<&str>,
) -> Result<(u16, Value), String> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .header("user-agent", "orders-e2e");
    if let Some(v) = if_match {
        builder = builder.header("if-match", v);
    }
    let request = builder
        .body(http_body_util::Full::new(Bytes::from(
            body.unwrap_or("").to_owned(),
        )))
        .map_err(|e| e.to_string())?;
    let response = http::send(addr, request).await?;
    let status = response.status().as_u16();
    let value = serde_json::from_slice(response.body()).unwrap_or(Value::Null);
    Ok((status, value))
}

#[derive(Debug, Default)]
struct OrderRun {
    id: Option<String>,
    expected: Option<Expected>,
    requests: u64,
    refusals: u64,
    mismatches: Vec<Mismatch>,
}

impl OrderRun {
    /// Sends one request, records a wrong answer, returns the answer.
    async fn expect(
        &mut self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        body: Option<&str>,
        if_match: Option<&str>,
        want: u16,
    ) -> Option<Value> {
        self.requests = self.requests.saturating_add(1);
        let label = format!(
            "{method} {path}{}",
            if_match
                .map(|v| format!(" If-Match: {v}"))
                .unwrap_or_default()
        );
        match call(addr, method, path, body, if_match).await {
            Ok((got, value)) if got == want => {
                if want >= 400 {
                    self.refusals = self.refusals.saturating_add(1);
                    // A refusal explains itself.
                    if value.get("error").and_then(Value::as_str).is_none() {
                        self.mismatches.push(Mismatch {
                            request: label,
                            expected: want,
                            got,
                            body: format!("no {{\"error\": ...}} message: {value}"),
                        });
                    }
                }
                Some(value)
            }
            Ok((got, value)) => {
                self.mismatches.push(Mismatch {
                    request: label,
                    expected: want,
                    got,
                    body: value.to_string(),
                });
                None
            }
            Err(e) => {
                self.mismatches.push(Mismatch {
                    request: label,
                    expected: want,
                    got: 0,
                    body: e,
                });
                None
            }
        }
    }

    fn accepted(&mut self, value: &Value) {
        let status = value.get("status").and_then(Value::as_str);
        let version = value.get("version").and_then(Value::as_u64);
        if let (Some(status), Some(version)) = (status, version) {
            self.expected = Some(Expected {
                status: status.to_owned(),
                version,
            });
        }
    }
}

fn new_order(i: usize) -> String {
    let items: Vec<Value> = (0..1 + i % 3)
        .map(|k| {
            json!({
                "sku": format!("SKU-{}", (i + k) % 7),
                "quantity": 1 + (i + k) % 4,
                "unitPriceCents": 250 + 125 * ((i + k) % 5),
            })
        })
        .collect();
    json!({"customerId": format!("c-{}", i % 37), "items": items}).to_string()
}

async fn run_order(addr: SocketAddr, i: usize) -> OrderRun {
    let mut run = OrderRun::default();
    let Some(created) = run
        .expect(addr, "POST", "/orders", Some(&new_order(i)), None, 201)
        .await
    else {
        return run;
    };
    let Some(id) = created
        .get("orderId")
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        run.mismatches.push(Mismatch {
            request: "POST /orders".into(),
            expected: 201,
            got: 201,
            body: format!("no orderId: {created}"),
        });
        return run;
    };
    run.accepted(&created);
    run.id = Some(id.clone());
    let pay = format!("/orders/{id}/pay");
    let cancel = format!("/orders/{id}/cancel");
    match Plan::of(i) {
        Plan::Create => {}
        Plan::Pay => {
            if let Some(v) = run.expect(addr, "POST", &pay, None, None, 200).await {
                run.accepted(&v);
            }
        }
        Plan::Cancel => {
            let reason = json!({"reason": "changed my mind"}).to_string();
            if let Some(v) = run
                .expect(addr, "POST", &cancel, Some(&reason), None, 200)
                .await
            {
                run.accepted(&v);
            }
        }
        Plan::CancelThenRefused => {
            if let Some(v) = run.expect(addr, "POST", &cancel, None, None, 200).await {
                run.accepted(&v);
            }
            run.expect(addr, "POST", &pay, None, None, 409).await;
            run.expect(addr, "POST", &cancel, None, None, 409).await;
        }
        Plan::PayThenStale => {
            if let Some(v) = run.expect(addr, "POST", &pay, None, Some("1"), 200).await {
                run.accepted(&v);
            }
            run.expect(addr, "POST", &cancel, None, Some("1"), 409)
                .await;
        }
    }
    run
}

/// Requests the API must refuse, none of which writes anything.
async fn bad_requests(addr: SocketAddr) -> OrderRun {
    let mut run = OrderRun::default();
    let unknown = "/orders/00000000-0000-7000-8000-000000000000";
    let pay_unknown = format!("{unknown}/pay");
    let cancel_unknown = format!("{unknown}/cancel");
    for (method, path, body, want) in [
        ("POST", "/orders", "{not json", 400),
        (
            "POST",
            "/orders",
            r#"{"customerId": "c-1", "items": []}"#,
            400,
        ),
        (
            "POST",
            "/orders",
            r#"{"customerId": "c-1", "items": [{"sku": "A1", "quantity": 0, "unitPriceCents": 100}]}"#,
            400,
        ),
        (
            "POST",
            "/orders",
            r#"{"customerId": "", "items": [{"sku": "A1", "quantity": 1, "unitPriceCents": 100}]}"#,
            400,
        ),
        ("POST", pay_unknown.as_str(), "", 404),
        ("POST", cancel_unknown.as_str(), "", 404),
        ("GET", unknown, "", 404),
    ] {
        let body = (!body.is_empty()).then_some(body);
        run.expect(addr, method, path, body, None, want).await;
    }
    run
}

/// Sends `orders` orders through the front door at `addr`, `concurrency`
/// at a time, and the bad requests.
pub async fn send(addr: SocketAddr, orders: usize, concurrency: usize) -> Traffic {
    let semaphore = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..orders {
        let semaphore = semaphore.clone();
        tasks.spawn(async move {
            let _permit = semaphore.acquire_owned().await;
            run_order(addr, i).await
        });
    }
    tasks.spawn(bad_requests(addr));
    let mut traffic = Traffic::default();
    while let Some(done) = tasks.join_next().await {
        let run = match done {
            Ok(run) => run,
            Err(e) => {
                traffic.mismatches.push(Mismatch {
                    request: "a request task".into(),
                    expected: 0,
                    got: 0,
                    body: e.to_string(),
                });
                continue;
            }
        };
        traffic.requests = traffic.requests.saturating_add(run.requests);
        traffic.refusals_checked = traffic.refusals_checked.saturating_add(run.refusals);
        traffic.mismatches.extend(run.mismatches);
        if let (Some(id), Some(expected)) = (run.id, run.expected) {
            traffic.expected.insert(id, expected);
        }
    }
    traffic
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_cover_every_path() {
        let plans: Vec<Plan> = (0..10).map(Plan::of).collect();
        for p in [
            Plan::Create,
            Plan::Pay,
            Plan::Cancel,
            Plan::CancelThenRefused,
            Plan::PayThenStale,
        ] {
            assert!(plans.contains(&p), "{p:?}");
        }
        let order: Value = serde_json::from_str(&new_order(5)).unwrap();
        assert!(!order["items"].as_array().unwrap().is_empty());
    }
}
