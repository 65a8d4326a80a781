//! The HTTP front door: a local server that does what API Gateway's HTTP
//! API does for a Lambda integration (payload format 2.0): turns each
//! request into an event, invokes `orders-api` through the emulator, and
//! answers with the function's response. A function error is a 502, as API
//! Gateway answers it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::events::{http_api_request, http_api_response};
use crate::http::{self, Body};
use crate::runtime::Function;

/// The running front door. Requests are spread over several execution
/// environments of the function, as Lambda scales a synchronous API.
#[derive(Debug)]
pub struct FrontDoor {
    addr: SocketAddr,
    server: JoinHandle<()>,
}

impl Drop for FrontDoor {
    fn drop(&mut self) {
        self.server.abort();
    }
}

#[derive(Debug)]
struct Shared {
    functions: Vec<Arc<Function>>,
    next: AtomicUsize,
}

impl FrontDoor {
    pub async fn start(functions: Vec<Arc<Function>>) -> std::io::Result<Self> {
        if functions.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the front door needs at least one function environment",
            ));
        }
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            functions,
            next: AtomicUsize::new(0),
        });
        let server = http::serve(listener, move |req| handle(shared.clone(), req));
        Ok(Self { addr, server })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = match http::read_body(body).await {
        Ok(b) => b,
        Err(e) => return http::json(StatusCode::BAD_REQUEST, &serde_json::json!({"message": e})),
    };
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let event = http_api_request(
        parts.method.as_str(),
        parts.uri.path(),
        parts.uri.query().unwrap_or(""),
        &headers,
        &body,
        &uuid::Uuid::new_v4().to_string(),
        "127.0.0.1",
    );
    let i = shared.next.fetch_add(1, Ordering::Relaxed) % shared.functions.len();
    let function = &shared.functions[i];
    let answer = match function.invoke(&event).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "front door: the function failed");
            return http::json(
                StatusCode::BAD_GATEWAY,
                &serde_json::json!({"message": "Internal Server Error"}),
            );
        }
    };
    match http_api_response(&answer) {
        Ok(r) => {
            let mut response = Response::new(http_body_util::Full::new(r.body.into()));
            *response.status_mut() =
                StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY);
            for (k, v) in r.headers {
                if let (Ok(k), Ok(v)) = (
                    hyper::header::HeaderName::from_bytes(k.as_bytes()),
                    hyper::header::HeaderValue::from_str(&v),
                ) {
                    response.headers_mut().append(k, v);
                }
            }
            response
        }
        Err(e) => {
            tracing::warn!(error = %e, "front door: malformed function response");
            http::json(
                StatusCode::BAD_GATEWAY,
                &serde_json::json!({"message": "Internal Server Error"}),
            )
        }
    }
}
