//! The Order service's HTTP API, independent of transport: a request in,
//! a status and a JSON body out. The Lambda function (`orders-api`) and the
//! local server (`orders-server`) are thin adapters around [`handle`].
//!
//! - `POST /orders` `{"customerId", "items": [{"sku", "quantity", "unitPriceCents"}]}` -> 201
//! - `GET /orders/{id}` -> 200
//! - `POST /orders/{id}/pay` -> 200
//! - `POST /orders/{id}/cancel` (optional body `{"reason"}`) -> 200
//!
//! `If-Match: <version>` on pay and cancel: a stale version is a 409.
//! Errors are `{"error": "..."}`: 400 malformed or invalid (nothing
//! written), 404 unknown order, 409 refused by the order's state or a
//! concurrent change, 503 store unavailable.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::domain::{Change, Meta, Order, OrderError, PlaceOrder};
use crate::service::{self, ServiceError};
use crate::store::OrderStore;

/// Largest request body read, in bytes: far above any valid order
/// (100 lines), far below the stores' limits.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// One HTTP request, as any transport hands it over.
#[derive(Debug, Clone, Copy, Default)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub body: &'a [u8],
    /// The `If-Match` header.
    pub if_match: Option<&'a str>,
    /// The `X-Correlation-Id` header, carried by the events.
    pub correlation_id: Option<&'a str>,
    /// The W3C `traceparent` header, carried by the events.
    pub traceparent: Option<&'a str>,
}

/// The answer: a status, a JSON body and a few headers.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub body: Value,
    /// `ETag` (the order's version) and `Location` where they apply.
    pub headers: Vec<(&'static str, String)>,
}

impl Response {
    fn error(status: u16, message: impl Into<String>) -> Self {
        Response {
            status,
            body: json!({ "error": message.into() }),
            headers: Vec::new(),
        }
    }

    fn order(status: u16, order: &Order) -> Self {
        Response {
            status,
            body: serde_json::to_value(order).unwrap_or_else(|e| json!({ "error": e.to_string() })),
            headers: vec![("etag", format!("\"{}\"", order.version))],
        }
    }

    /// The body as JSON text.
    pub fn body_text(&self) -> String {
        self.body.to_string()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    reason: Option<String>,
}

/// Answers one request.
pub async fn handle<S: OrderStore>(store: &S, request: Request<'_>) -> Response {
    let path = request.path.trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let meta = Meta {
        correlation_id: request.correlation_id.map(str::to_owned),
        traceparent: request.traceparent.map(str::to_owned),
    };
    if request.body.len() > MAX_BODY_BYTES {
        return Response::error(
            413,
            format!("the request body is over {MAX_BODY_BYTES} bytes"),
        );
    }
    match (request.method, segments.as_slice()) {
        ("POST", ["orders"]) => create(store, request.body, &meta).await,
        ("GET", ["orders", id]) => match known_id(id) {
            Some(id) => match service::get(store, id).await {
                Ok(order) => Response::order(200, &order),
                Err(e) => failure(e),
            },
            None => not_found(id),
        },
        ("POST", ["orders", id, "pay"]) => {
            let Some(id) = known_id(id) else {
                return not_found(id);
            };
            let if_match = match if_match(request.if_match) {
                Ok(v) => v,
                Err(r) => return r,
            };
            changed(service::pay(store, id, if_match, &meta).await)
        }
        ("POST", ["orders", id, "cancel"]) => {
            let Some(id) = known_id(id) else {
                return not_found(id);
            };
            let if_match = match if_match(request.if_match) {
                Ok(v) => v,
                Err(r) => return r,
            };
            let reason = match cancel_reason(request.body) {
                Ok(r) => r,
                Err(r) => return r,
            };
            changed(service::cancel(store, id, reason.as_deref(), if_match, &meta).await)
        }
        (_, ["orders"] | ["orders", _] | ["orders", _, "pay" | "cancel"]) => Response::error(
            405,
            format!("{} is not allowed on {}", request.method, request.path),
        ),
        _ => Response::error(404, format!("no route {} {}", request.method, request.path)),
    }
}

/// An id that could name an order; anything else names none.
fn known_id(id: &str) -> Option<&str> {
    let ok = !id.is_empty()
        && id.len() <= crate::domain::order::MAX_TEXT_BYTES
        && !id.chars().any(char::is_control);
    ok.then_some(id)
}

fn not_found(id: &str) -> Response {
    Response::error(404, format!("no order {id}"))
}

async fn create<S: OrderStore>(store: &S, body: &[u8], meta: &Meta) -> Response {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Response::error(
            400,
            "the body must be a JSON order: {\"customerId\": ..., \"items\": [{\"sku\": ..., \"quantity\": ..., \"unitPriceCents\": ...}]}",
        );
    }
    let request: PlaceOrder = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return Response::error(400, format!("malformed order: {e}")),
    };
    match service::place(store, request, meta).await {
        Ok(change) => {
            let mut response = Response::order(201, &change.order);
            response
                .headers
                .push(("location", format!("/orders/{}", change.order.id)));
            response
        }
        Err(e) => failure(e),
    }
}

fn cancel_reason(body: &[u8]) -> Result<Option<String>, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice::<CancelBody>(body)
        .map(|b| b.reason)
        .map_err(|e| {
            Response::error(
                400,
                format!("malformed cancellation: {e}; expected {{\"reason\": \"...\"}} or no body"),
            )
        })
}

/// `If-Match: 3`, `"3"` or `W/"3"`: the version the caller last saw.
fn if_match(header: Option<&str>) -> Result<Option<u64>, Response> {
    let Some(raw) = header else {
        return Ok(None);
    };
    let v = raw.trim();
    let v = v.strip_prefix("W/").unwrap_or(v).trim_matches('"');
    v.parse().map(Some).map_err(|_| {
        Response::error(
            400,
            format!("If-Match must be the order's version (a number), not {raw:?}"),
        )
    })
}

fn changed(result: Result<Change, ServiceError>) -> Response {
    match result {
        Ok(change) => Response::order(200, &change.order),
        Err(e) => failure(e),
    }
}

fn failure(e: ServiceError) -> Response {
    match &e {
        ServiceError::NotFound(_) => Response::error(404, e.to_string()),
        ServiceError::Refused(OrderError::Invalid(_)) => Response::error(400, e.to_string()),
        ServiceError::Refused(_)
        | ServiceError::StaleVersion { .. }
        | ServiceError::Conflict(_) => Response::error(409, e.to_string()),
        ServiceError::Store(s) if s.is_retryable() => {
            tracing::warn!(error = %s, "orders: store unavailable");
            Response::error(503, "the order store is unavailable; try again")
        }
        ServiceError::Store(s) => {
            tracing::error!(error = %s, "orders: store failed");
            Response::error(500, "the order store failed; see the service's log")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_match_reads_plain_quoted_and_weak_versions() {
        assert_eq!(if_match(None).ok(), Some(None));
        assert_eq!(if_match(Some("3")).ok(), Some(Some(3)));
        assert_eq!(if_match(Some("\"3\"")).ok(), Some(Some(3)));
        assert_eq!(if_match(Some("W/\"3\"")).ok(), Some(Some(3)));
        assert_eq!(if_match(Some("abc")).map_err(|r| r.status), Err(400));
    }

    #[test]
    fn cancel_body_is_optional_but_must_be_well_formed() {
        assert_eq!(cancel_reason(b"").ok(), Some(None));
        assert_eq!(
            cancel_reason(br#"{"reason":"late"}"#).ok(),
            Some(Some("late".to_owned()))
        );
        assert_eq!(cancel_reason(b"{").map_err(|r| r.status), Err(400));
        assert_eq!(
            cancel_reason(br#"{"why":"x"}"#).map_err(|r| r.status),
            Err(400)
        );
    }
}
