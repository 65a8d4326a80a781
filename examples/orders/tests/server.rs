//! `orders-server` as a process on SQLite: the API over real HTTP, and the
//! in-process relay delivering to Shipping.

#![allow(clippy::unwrap_used)] // tests fail loudly

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(store: &str) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_orders-server"))
        .args(["--store", store, "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    Server { child, addr }
}

/// One HTTP/1.1 request; the status and the JSON body.
fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[test]
fn the_api_over_http_and_shipping_in_process() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("orders.db");
    let server = start(&format!("sqlite://{}", db.display()));
    let addr = server.addr.as_str();

    let (status, body) = request(
        addr,
        "POST",
        "/orders",
        r#"{"customerId": "c-1", "items": [{"sku": "A1", "quantity": 2, "unitPriceCents": 1250}]}"#,
        &[],
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["totalCents"], 2500);
    let id = body["orderId"].as_str().unwrap().to_owned();

    let (status, body) = request(
        addr,
        "POST",
        "/orders",
        r#"{"customerId": "c-1", "items": [{"sku": "A1", "quantity": 1e30, "unitPriceCents": 1}]}"#,
        &[],
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("malformed order"),
        "{body}"
    );
    let (status, _) = request(addr, "POST", "/orders/nope/cancel", "", &[]);
    assert_eq!(status, 404);

    let (status, body) = request(
        addr,
        "POST",
        &format!("/orders/{id}/pay"),
        "",
        &[("If-Match", "\"1\"")],
    );
    assert_eq!(
        (status, &body["status"]),
        (200, &Value::from("paid")),
        "{body}"
    );
    let (status, body) = request(
        addr,
        "POST",
        &format!("/orders/{id}/cancel"),
        "",
        &[("If-Match", "1")],
    );
    assert_eq!(status, 409, "stale If-Match: {body}");

    // The relay delivers OrderCreated and OrderPaid to Shipping.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = request(addr, "GET", &format!("/shipments/{id}"), "", &[]);
        if status == 200 && body["status"] == "ready_to_ship" {
            assert_eq!(body["orderVersion"], 2);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no shipment after 30 s: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The database agrees: one order, two events published (marked just
    // after delivery), both in the inbox.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let outbox = outbox_sqlite::SqliteOutbox::open(&db).await.unwrap();
        loop {
            let counts: (i64, i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM orders),
                        (SELECT count(*) FROM outbox WHERE status = 'published'),
                        (SELECT count(*) FROM inbox WHERE consumer = 'shipping')",
            )
            .fetch_one(outbox.pool())
            .await
            .unwrap();
            if counts == (1, 2, 2) {
                break;
            }
            assert!(Instant::now() < deadline, "the tables hold {counts:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    drop(server);
}
