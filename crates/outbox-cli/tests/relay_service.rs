//! `outbox relay` as a service: its `/metrics`, `/healthz` and `/readyz`
//! endpoint read over HTTP while it runs, on SQLite and PostgreSQL, its JSON
//! logs, and readiness following a broker cut through the fault proxy.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use outbox_core::{Event, EventId};
use outbox_nats::async_nats;
use outbox_postgres::PostgresOutbox;
use outbox_sqlite::SqliteOutbox;
use outbox_testkit::order_event;
use outbox_testkit::proxy::FaultProxy;

const NATS: &str = "127.0.0.1:4222";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", EventId::new().as_uuid().simple())
}

/// 40 events: versions 1 to 4 of ten orders.
fn events() -> Vec<Event> {
    (0..10)
        .flat_map(|o| (1..=4).map(move |v| order_event(&format!("o-{o}"), v, "OrderUpdated")))
        .collect()
}

fn write_sqlite(db: &Path, events: &[Event]) {
    runtime().block_on(async {
        let outbox = SqliteOutbox::open(db).await.expect("open");
        let mut tx = outbox.pool().begin().await.expect("begin");
        outbox.append(&mut tx, events).await.expect("append");
        tx.commit().await.expect("commit");
    });
}

/// A port nothing listens on, for the relay to take.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A relay process with its endpoint, and its stderr lines as they come.
struct Service {
    child: Child,
    addr: String,
    log: mpsc::Receiver<String>,
}

impl Service {
    fn start(store: &str, to: &str, extra: &[&str]) -> Service {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut child = Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args([
                "relay",
                "--store",
                store,
                "--to",
                to,
                "--metrics-addr",
                &addr,
            ])
            .args(["--stats-every", "1s", "--poll", "50ms"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start relay");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Service { child, addr, log }
    }

    /// `(status code, body)` of a GET, or None while nothing answers.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut stream = TcpStream::connect(&self.addr).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        let code = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, body.to_owned()))
    }

    /// The samples of `/metrics`, by name with labels.
    fn metrics(&self) -> HashMap<String, f64> {
        let Some((200, body)) = self.get("/metrics") else {
            return HashMap::new();
        };
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (name, value) = l.rsplit_once(' ').expect("name and value");
                let value = match value {
                    "+Inf" => f64::INFINITY,
                    v => v.parse().unwrap_or_else(|e| panic!("{l}: {e}")),
                };
                (name.to_owned(), value)
            })
            .collect()
    }

    /// Polls `/metrics` until `done` holds for them, and returns them.
    fn metrics_until(
        &self,
        what: &str,
        done: impl Fn(&HashMap<String, f64>) -> bool,
    ) -> HashMap<String, f64> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let m = self.metrics();
            if done(&m) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "waited for {what}; last metrics: {m:?}; relay log: {:?}",
                self.log_so_far()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn readyz_until(&self, code: u16) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.get("/readyz") {
                Some((c, body)) if c == code => return body,
                other => assert!(
                    Instant::now() < deadline,
                    "waited for /readyz {code}; last answer {other:?}; relay log: {:?}",
                    self.log_so_far()
                ),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_so_far(&self) -> Vec<String> {
        self.log.try_iter().collect()
    }

    /// SIGTERM, then the exit status and every log line.
    fn stop(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success());
        let status = self.child.wait().expect("wait");
        (status, self.log.try_iter().collect())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What every running relay's endpoint shows once its events are out.
fn assert_drained_metrics(m: &HashMap<String, f64>, events: f64) {
    assert_eq!(m["outbox_relay_published_total"], events);
    assert_eq!(m["outbox_relay_failed_total"], 0.0);
    assert_eq!(m["outbox_relay_dead_lettered_total"], 0.0);
    assert_eq!(m["outbox_target_up"], 1.0);
    assert_eq!(m["outbox_store_up"], 1.0);
    assert_eq!(m["outbox_dead_letter_events"], 0.0);
    assert_eq!(m["outbox_oldest_pending_age_seconds"], 0.0);
    assert_eq!(m["outbox_relay_commit_to_publish_seconds_count"], events);
    assert_eq!(
        m["outbox_relay_commit_to_publish_seconds_bucket{le=\"+Inf\"}"],
        events
    );
    assert!(m["outbox_relay_commit_to_publish_seconds_sum"] > 0.0);
    for timed in ["claim", "publish", "settle"] {
        let count = m[&format!("outbox_relay_{timed}_duration_seconds_count")];
        assert!(count >= 1.0, "{timed}: {count}");
    }
    // Buckets are cumulative.
    let mut buckets: Vec<(f64, f64)> = m
        .iter()
        .filter_map(|(k, v)| {
            let le = k
                .strip_prefix("outbox_relay_claim_duration_seconds_bucket{le=\"")?
                .strip_suffix("\"}")?;
            Some((le.parse().unwrap_or(f64::INFINITY), *v))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(buckets.len() > 10);
    assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{buckets:?}");
}

#[test]
fn sqlite_relay_serves_metrics_health_and_json_logs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("service.db");
    let events = events();
    write_sqlite(&db, &events);
    let store = format!("sqlite://{}", db.display());
    let service = Service::start(&store, "null://", &["--log-format", "json"]);

    let m = service.metrics_until("every event published and counted as pending 0", |m| {
        m.get("outbox_relay_published_total") == Some(&40.0)
            && m.get("outbox_pending_events") == Some(&0.0)
    });
    assert_drained_metrics(&m, 40.0);
    assert_eq!(m["outbox_published_events"], 40.0);
    assert_eq!(service.get("/healthz"), Some((200, "ok\n".to_owned())));
    assert_eq!(service.readyz_until(200), "ready\n");
    let (code, body) = service.get("/nothing").expect("an answer");
    assert_eq!(code, 404, "{body}");
    let (code, _) = service.get("/metrics").expect("an answer");
    assert_eq!(code, 200);

    // Events written while it runs are counted as pending, then published.
    write_sqlite(&db, &[order_event("o-late", 1, "OrderCreated")]);
    service.metrics_until("the late event", |m| {
        m.get("outbox_relay_published_total") == Some(&41.0)
    });

    let (status, log) = service.stop();
    assert!(status.success(), "SIGTERM is a clean stop: {status:?}");
    // Every log line is one JSON object with a level and a message.
    let json: Vec<serde_json::Value> = log
        .iter()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert!(
        json.iter()
            .any(|l| l["message"] == "relay started" && l["level"] == "INFO"),
        "{log:?}"
    );
    assert!(
        json.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("metrics endpoint"))),
        "{log:?}"
    );
}

#[test]
fn postgres_relay_serves_metrics_while_it_runs() {
    let url = std::env::var("OUTBOX_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let schema = unique("service");
    let store = format!("{url}?schema={schema}");
    let rt = runtime();
    let outbox = rt.block_on(async {
        let outbox = PostgresOutbox::connect(&url)
            .await
            .expect("connect")
            .schema(&schema)
            .expect("schema");
        outbox.migrate().await.expect("migrate");
        let mut tx = outbox.pool().begin().await.expect("begin");
        outbox.append(&mut tx, &events()).await.expect("append");
        tx.commit().await.expect("commit");
        outbox
    });
    let service = Service::start(&store, "null://", &[]);
    let m = service.metrics_until("every event published", |m| {
        m.get("outbox_relay_published_total") == Some(&40.0)
            && m.get("outbox_pending_events") == Some(&0.0)
    });
    assert_drained_metrics(&m, 40.0);
    assert_eq!(service.readyz_until(200), "ready\n");
    let (status, _) = service.stop();
    assert!(status.success(), "{status:?}");
    rt.block_on(async {
        let drop = format!("DROP SCHEMA \"{schema}\" CASCADE");
        sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
            .execute(outbox.pool())
            .await
            .expect("drop schema");
    });
}

#[test]
fn readiness_follows_a_broker_cut_and_nothing_is_dead_lettered() {
    let rt = runtime();
    let proxy = rt
        .block_on(FaultProxy::start(NATS.parse().expect("address")))
        .expect("proxy");
    let line = proxy.handle();
    let stream = unique("SERVICE");
    let target = format!(
        "{}?stream={stream}&subject={stream}.{{aggregatetype}}.{{type}}",
        proxy.url_for("nats")
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("cut.db");
    let store = format!("sqlite://{}", db.display());
    write_sqlite(&db, &[]); // the relay opens only a store that exists
    let service = Service::start(&store, &target, &["--publish-timeout", "1s"]);
    assert_eq!(service.readyz_until(200), "ready\n");

    line.cut();
    line.refuse();
    write_sqlite(&db, &events());
    let why = service.readyz_until(503);
    assert!(why.contains("target unavailable since"), "{why}");
    let m = service.metrics_until("the outage", |m| m.get("outbox_target_up") == Some(&0.0));
    assert_eq!(m["outbox_relay_dead_lettered_total"], 0.0);
    assert!(m["outbox_relay_failed_total"] >= 1.0);
    assert!(m["outbox_relay_outages_total"] >= 1.0);
    // The relay is alive and says so, while not ready.
    assert_eq!(service.get("/healthz"), Some((200, "ok\n".to_owned())));

    line.accept();
    line.restore();
    // The endpoint follows the relay's state once a second.
    let m = service.metrics_until("the backlog after the cut", |m| {
        m.get("outbox_relay_published_total") == Some(&40.0)
            && m.get("outbox_pending_events") == Some(&0.0)
            && m.get("outbox_target_up") == Some(&1.0)
    });
    assert_eq!(m["outbox_relay_dead_lettered_total"], 0.0);
    assert_eq!(m["outbox_dead_letter_events"], 0.0);
    assert_eq!(service.readyz_until(200), "ready\n");
    let (status, _) = service.stop();
    assert!(status.success(), "{status:?}");

    rt.block_on(async {
        let client = async_nats::connect(NATS).await.expect("nats");
        let js = async_nats::jetstream::new(client);
        let mut found = js.get_stream(&stream).await.expect("stream");
        let messages = found.info().await.expect("info").state.messages;
        js.delete_stream(&stream).await.expect("delete stream");
        assert_eq!(messages, 40, "each event once, by its Nats-Msg-Id");
    });
}
