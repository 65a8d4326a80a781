//! The small HTTP/1 server and client the emulator, the front door, the
//! fault proxy and the load generator share (hyper 1, one connection a
//! request on the client side: everything here is on loopback).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

pub type Body = Full<Bytes>;

/// Serves `handler` on `listener` until the returned task is aborted;
/// aborting it also closes every open connection (their tasks live in a
/// set the server task owns), which is what the emulator needs when an
/// execution environment goes away.
pub fn serve<F, Fut>(listener: TcpListener, handler: F) -> JoinHandle<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let handler = handler.clone();
                        connections.spawn(async move {
                            let service = service_fn(move |req| {
                                let handler = handler.clone();
                                async move { Ok::<_, Infallible>(handler(req).await) }
                            });
                            // A client that goes away mid-request is not our failure.
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                    // Out of descriptors or similar: wait instead of spinning.
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    })
}

/// A response with a body and a content type.
pub fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// A JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    respond(status, "application/json", value.to_string())
}

/// Reads a whole request or response body.
pub async fn read_body(body: Incoming) -> Result<Bytes, String> {
    body.collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| format!("cannot read the body: {e}"))
}

/// Sends `request` to `addr` on a fresh connection and reads the whole
/// response.
pub async fn send(addr: SocketAddr, request: Request<Body>) -> Result<Response<Bytes>, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake with {addr}: {e}"))?;
    tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request to {addr}: {e}"))?;
    let (parts, body) = response.into_parts();
    let bytes = read_body(body).await?;
    Ok(Response::from_parts(parts, bytes))
}

/// `host:port` of an `http://` URL, for the emulators' endpoints.
pub fn socket_addr_of(url: &str) -> Result<SocketAddr, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// endpoints on loopback are supported"))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let authority = authority.replace("localhost", "127.0.0.1");
    authority
        .parse()
        .map_err(|e| format!("{url}: not host:port with an IP address: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            socket_addr_of("http://127.0.0.1:5000").unwrap(),
            "127.0.0.1:5000".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            socket_addr_of("http://localhost:8000/").unwrap().port(),
            8000
        );
        assert!(socket_addr_of("https://example.invalid").is_err());
    }
}
