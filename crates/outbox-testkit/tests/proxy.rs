//! The fault proxy against small servers of the test's own: each fault does
//! what it says, and only that.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use outbox_testkit::proxy::Direction;
use outbox_testkit::FaultProxy;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Longest a test waits for something that should happen at once.
const SOON: Duration = Duration::from_secs(2);

/// A server that sends back whatever it gets.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// The response of [`request_server`]: 1000 bytes.
fn response() -> Vec<u8> {
    (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect()
}

/// A server that answers each line it reads with [`response`].
async fn request_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(_)) = lines.next_line().await {
                    if w.write_all(&response()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Waits up to [`SOON`] for `done`.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + SOON;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn connect(proxy: &FaultProxy) -> TcpStream {
    let stream = TcpStream::connect(proxy.addr())
        .await
        .expect("connect through the proxy");
    stream.set_nodelay(true).expect("nodelay");
    stream
}

/// Sends `msg` and reads as many bytes back.
async fn round_trip(stream: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    stream.write_all(msg).await.expect("write");
    let mut back = vec![0; msg.len()];
    tokio::time::timeout(SOON, stream.read_exact(&mut back))
        .await
        .expect("no answer")
        .expect("read");
    back
}

/// Reads until the stream ends; the reset or error, if any, ends it too.
async fn read_until_closed(stream: &mut TcpStream) -> (Vec<u8>, Option<ErrorKind>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let read = tokio::time::timeout(SOON, stream.read(&mut buf))
            .await
            .expect("the connection stayed open");
        match read {
            Ok(0) => return (got, None),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Some(e.kind())),
        }
    }
}

/// A connection through the proxy gets nothing: refused, reset or closed.
async fn assert_refused(proxy: &FaultProxy) {
    let Ok(mut stream) = TcpStream::connect(proxy.addr()).await else {
        return;
    };
    let _ = stream.write_all(b"ping").await;
    let (got, _) = read_until_closed(&mut stream).await;
    assert!(got.is_empty(), "a refused connection answered {got:?}");
}

#[tokio::test]
async fn forwards_both_ways_and_counts() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    assert_eq!(proxy.url_for("http"), format!("http://{}", proxy.addr()));
    let mut stream = connect(&proxy).await;
    assert_eq!(round_trip(&mut stream, b"hello").await, b"hello");
    let stats = proxy.stats();
    assert_eq!(stats.accepted, 1);
    assert_eq!(stats.live, 1);
    assert_eq!(stats.bytes_to_upstream, 5);
    assert_eq!(stats.bytes_to_client, 5);
    drop(stream);
    eventually("the connection stayed live", || proxy.stats().live == 0).await;
}

#[tokio::test]
async fn large_transfers_arrive_intact() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let stream = connect(&proxy).await;
    let (mut r, mut w) = stream.into_split();
    let sent: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let expected = sent.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    tokio::time::timeout(SOON, r.read_to_end(&mut got))
        .await
        .expect("the transfer stalled")
        .unwrap();
    writer.await.unwrap();
    assert!(got == expected, "{} bytes back, not the same", got.len());
    let stats = proxy.stats();
    assert_eq!(stats.bytes_to_upstream, expected.len() as u64);
    assert_eq!(stats.bytes_to_client, expected.len() as u64);
}

#[tokio::test]
async fn latency_delays_each_way_it_is_set_on() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let mut stream = connect(&proxy).await;
    proxy.set_latency_on(Direction::ToClient, Duration::from_millis(150));
    let start = Instant::now();
    round_trip(&mut stream, b"a").await;
    let one_way = start.elapsed();
    assert!(one_way >= Duration::from_millis(150), "{one_way:?}");

    proxy.set_latency(Duration::from_millis(100));
    let start = Instant::now();
    round_trip(&mut stream, b"b").await;
    let both_ways = start.elapsed();
    assert!(both_ways >= Duration::from_millis(200), "{both_ways:?}");

    // Not accumulated: each exchange pays the same again, no more.
    for _ in 0..3 {
        let start = Instant::now();
        round_trip(&mut stream, b"c").await;
        let again = start.elapsed();
        assert!(again >= Duration::from_millis(200), "{again:?}");
        assert!(again < Duration::from_millis(600), "{again:?}");
    }

    proxy.set_latency(Duration::ZERO);
    let start = Instant::now();
    round_trip(&mut stream, b"d").await;
    let none = start.elapsed();
    assert!(none < Duration::from_millis(200), "{none:?}");
}

/// A response written in several pieces is late by the latency once, as
/// over a long cable, not once per piece.
#[tokio::test]
async fn latency_is_paid_once_per_response_whatever_its_pieces() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        if let Ok((mut stream, _)) = listener.accept().await {
            let mut line = [0u8; 1];
            if stream.read_exact(&mut line).await.is_ok() {
                // Headers, then the body a moment later: two chunks.
                for piece in [&b"head:"[..], &b"body"[..], &b"!"[..]] {
                    let _ = stream.write_all(piece).await;
                    let _ = stream.flush().await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    });
    let proxy = FaultProxy::start(addr).await.unwrap();
    proxy.set_latency_on(Direction::ToClient, Duration::from_millis(200));
    let mut stream = connect(&proxy).await;
    let start = Instant::now();
    stream.write_all(b"?").await.unwrap();
    let mut got = vec![0u8; 10];
    stream.read_exact(&mut got).await.unwrap();
    let took = start.elapsed();
    assert_eq!(got, b"head:body!");
    assert!(took >= Duration::from_millis(200), "{took:?}");
    assert!(
        took < Duration::from_millis(380),
        "paid per piece: {took:?}"
    );
}

#[tokio::test]
async fn refuse_closes_new_connections_only_until_accept() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let mut before = connect(&proxy).await;
    assert_eq!(round_trip(&mut before, b"1").await, b"1");

    proxy.refuse();
    assert_refused(&proxy).await;
    assert_eq!(proxy.stats().refused, 1);
    assert_eq!(
        round_trip(&mut before, b"2").await,
        b"2",
        "a live connection was touched"
    );

    proxy.accept();
    let mut after = connect(&proxy).await;
    assert_eq!(round_trip(&mut after, b"3").await, b"3");
}

#[tokio::test]
async fn cut_closes_live_connections_and_refuses_until_restore() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let mut live = connect(&proxy).await;
    assert_eq!(round_trip(&mut live, b"x").await, b"x");

    proxy.cut();
    let (got, _) = read_until_closed(&mut live).await;
    assert!(got.is_empty());
    assert_refused(&proxy).await;

    proxy.restore();
    let mut again = connect(&proxy).await;
    assert_eq!(round_trip(&mut again, b"y").await, b"y");
}

#[tokio::test]
async fn pause_holds_bytes_and_resume_delivers_them() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let mut stream = connect(&proxy).await;
    assert_eq!(round_trip(&mut stream, b"warm").await, b"warm");

    proxy.pause();
    stream.write_all(b"held").await.unwrap();
    let mut buf = [0u8; 4];
    let early = tokio::time::timeout(Duration::from_millis(300), stream.read_exact(&mut buf)).await;
    assert!(early.is_err(), "bytes went through a paused proxy");
    assert_eq!(proxy.stats().bytes_to_client, 4);

    proxy.resume();
    tokio::time::timeout(SOON, stream.read_exact(&mut buf))
        .await
        .expect("held bytes were not delivered")
        .unwrap();
    assert_eq!(&buf, b"held");
}

#[tokio::test]
async fn cut_mid_response_delivers_exactly_n_bytes_then_the_end() {
    let proxy = FaultProxy::start(request_server().await).await.unwrap();
    proxy.cut_mid_response(123);
    let mut stream = connect(&proxy).await;
    stream.write_all(b"GET /\n").await.unwrap();
    let (got, error) = read_until_closed(&mut stream).await;
    assert_eq!(error, None);
    assert_eq!(got, &response()[..123]);

    // Once: the next response is whole.
    let mut stream = connect(&proxy).await;
    stream.write_all(b"GET /\n").await.unwrap();
    let mut whole = vec![0; 1000];
    tokio::time::timeout(SOON, stream.read_exact(&mut whole))
        .await
        .expect("no answer")
        .unwrap();
    assert_eq!(whole, response());
}

#[tokio::test]
async fn a_cut_can_span_chunks_and_fall_on_a_later_response() {
    let proxy = FaultProxy::start(request_server().await).await.unwrap();
    let mut stream = connect(&proxy).await;
    proxy.cut_mid_response(1500);
    stream.write_all(b"one\n").await.unwrap();
    let mut first = vec![0; 1000];
    stream.read_exact(&mut first).await.unwrap();
    stream.write_all(b"two\n").await.unwrap();
    let (got, error) = read_until_closed(&mut stream).await;
    assert_eq!(error, None);
    assert_eq!(got, &response()[..500]);
}

#[tokio::test]
async fn reset_resets_live_connections_once() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let mut live = connect(&proxy).await;
    assert_eq!(round_trip(&mut live, b"r").await, b"r");

    proxy.reset();
    let (got, error) = read_until_closed(&mut live).await;
    assert!(got.is_empty());
    assert_eq!(error, Some(ErrorKind::ConnectionReset));

    let mut after = connect(&proxy).await;
    assert_eq!(round_trip(&mut after, b"s").await, b"s");
}

#[tokio::test]
async fn an_unreachable_service_looks_refused() {
    // A port nothing listens on: bound, then released.
    let gone = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = FaultProxy::start(gone).await.unwrap();
    assert_refused(&proxy).await;
}

#[tokio::test]
async fn dropping_the_proxy_closes_its_port_and_connections() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let addr = proxy.addr();
    let handle = proxy.handle();
    let mut live = connect(&proxy).await;
    assert_eq!(round_trip(&mut live, b"z").await, b"z");

    drop(proxy);
    let (got, _) = read_until_closed(&mut live).await;
    assert!(got.is_empty());
    let deadline = Instant::now() + SOON;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "the port stayed open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A handle that outlived the proxy is harmless.
    handle.cut();
    eventually("the connection stayed live", || handle.stats().live == 0).await;
}
