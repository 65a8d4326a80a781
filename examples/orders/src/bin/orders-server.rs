//! `orders-server`: the Order service's HTTP API as a local server on
//! SQLite or PostgreSQL, with a relay that delivers its events to the
//! Shipping service in the same process (through the inbox, as a broker
//! would: at least once, applied once).
//!
//! ```text
//! orders-server --store sqlite://orders.db --listen 127.0.0.1:8080
//! orders-server --store postgres://postgres@127.0.0.1:5432/test?schema=orders
//! OUTBOX_STORE=postgres://app:PASSWORD@db:5432/shop orders-server   # kept out of the process list
//! ```
//!
//! Beside the API: `GET /shipments/{orderId}` shows the Shipping service's
//! view of an order.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use orders::api;
use orders::store::postgres::PostgresStore;
use orders::store::sqlite::SqliteStore;
use orders::store::{OrderStore, ShipmentStore};
use outbox_core::publish::{fail_all, PublishRequest, PublishResult};
use outbox_core::{ClaimSource, PublishError, Publisher, Relay, RelayConfig};
use outbox_registry::{Store, StoreUrl};
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(Debug, Parser)]
#[command(
    name = "orders-server",
    about = "The Order service's HTTP API on SQLite or PostgreSQL, with Shipping in-process"
)]
struct Args {
    /// sqlite://FILE or postgres://USER@HOST:PORT/DB[?schema=NAME]
    #[arg(long, env = "OUTBOX_STORE", hide_env_values = true)]
    store: String,
    /// Address to listen on (port 0: any free port; the address taken is
    /// printed on the first line of output).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Serve the API only: no relay, no Shipping service.
    #[arg(long)]
    no_shipping: bool,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Err(e) = run(args).await {
        eprintln!("orders-server: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), String> {
    let url: StoreUrl = args.store.parse().map_err(|e| format!("--store: {e}"))?;
    let store = url.open(None).await.map_err(|e| e.to_string())?;
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    match store {
        Store::Sqlite(outbox) => {
            let store = SqliteStore::open(outbox.clone())
                .await
                .map_err(|e| e.to_string())?;
            serve(store, outbox, listener, addr, !args.no_shipping).await
        }
        Store::Postgres(outbox) => {
            let store = PostgresStore::open(outbox.clone())
                .await
                .map_err(|e| e.to_string())?;
            serve(store, outbox, listener, addr, !args.no_shipping).await
        }
        _ => Err(format!(
            "--store {url}: the local server runs on sqlite:// or postgres://; \
             on DynamoDB the API is the orders-api Lambda function"
        )),
    }
}

/// Delivers the relay's events straight to the Shipping service: each
/// batch is one Shipping transaction; a failed one is retried by the relay.
struct ToShipping<S>(Arc<S>);

impl<S: ShipmentStore> Publisher for ToShipping<S> {
    async fn publish(&self, request: PublishRequest<'_>) -> Vec<PublishResult> {
        match self.0.ship(request.events).await {
            Ok(_) => vec![Ok(()); request.events.len()],
            Err(e) => fail_all(&request, PublishError::transient(format!("shipping: {e}"))),
        }
    }
}

async fn serve<S, C>(
    store: S,
    source: C,
    listener: TcpListener,
    addr: SocketAddr,
    shipping: bool,
) -> Result<(), String>
where
    S: OrderStore + ShipmentStore + 'static,
    C: ClaimSource + 'static,
{
    let store = Arc::new(store);
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let relay = if shipping {
        let relay = Relay::new(source, ToShipping(store.clone()), RelayConfig::default())
            .map_err(|e| e.to_string())?;
        let mut stop = stop_rx.clone();
        Some(tokio::spawn(async move {
            relay
                .run(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        }))
    } else {
        None
    };
    println!("listening on http://{addr}");
    tracing::info!(%addr, shipping, "orders-server ready");
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = shutdown_signal() => break,
            _ = stop_rx.wait_for(|s| *s) => break,
        };
        let store = store.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let store = store.clone();
                async move { Ok::<_, Infallible>(respond(&*store, req).await) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "connection ended");
            }
        });
    }
    let _ = stop_tx.send(true);
    if let Some(relay) = relay {
        match relay.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("relay: {e}")),
            Err(e) => return Err(format!("relay task: {e}")),
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn json(
    status: u16,
    body: &serde_json::Value,
    headers: &[(&str, String)],
) -> Response<Full<Bytes>> {
    let mut response = Response::builder()
        .status(status)
        .header("content-type", "application/json");
    for (name, value) in headers {
        response = response.header(*name, value);
    }
    response
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::from_static(b"{}"))))
}

async fn respond<S: OrderStore + ShipmentStore>(
    store: &S,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, api::MAX_BODY_BYTES).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return json(
                413,
                &serde_json::json!({ "error": format!("cannot read the request body: {e}") }),
                &[],
            )
        }
    };
    let path = parts.uri.path();
    if let (&hyper::Method::GET, Some(order_id)) = (&parts.method, path.strip_prefix("/shipments/"))
    {
        return match store.shipment(order_id).await {
            Ok(Some(s)) => json(200, &serde_json::to_value(s).unwrap_or_default(), &[]),
            Ok(None) => json(
                404,
                &serde_json::json!({ "error": format!("no shipment for order {order_id}") }),
                &[],
            ),
            Err(e) => json(500, &serde_json::json!({ "error": e.to_string() }), &[]),
        };
    }
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let answer = api::handle(
        store,
        api::Request {
            method: parts.method.as_str(),
            path,
            body: &body,
            if_match: header("if-match"),
            correlation_id: header("x-correlation-id"),
            traceparent: header("traceparent"),
        },
    )
    .await;
    json(answer.status, &answer.body, &answer.headers)
}
