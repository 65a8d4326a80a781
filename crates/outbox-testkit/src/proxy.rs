//! A TCP proxy that breaks the connection to a real service on purpose:
//! latency, refused connections, connections cut or reset, a response cut
//! short, traffic held. The service itself keeps running, so an outage test
//! does not disturb anything else that uses it.
//!
//! Every fault is switched at run time, through [`FaultProxy`] or a
//! [`ProxyHandle`] cloned from it. Dropping the proxy closes its port and
//! every connection through it.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Largest chunk read from one side before it is written to the other: the
/// most a connection holds per direction while paused or delayed.
const CHUNK_BYTES: usize = 16 * 1024;

/// How long the proxy waits before accepting again after `accept` failed
/// (out of file descriptors, say), rather than spinning.
const ACCEPT_RETRY: Duration = Duration::from_millis(20);

/// `cut_after` when no cut is armed.
const NO_CUT: usize = usize::MAX;

/// Which way bytes flow through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the client to the service: requests.
    ToUpstream,
    /// From the service to the client: responses.
    ToClient,
}

/// Counters since the proxy started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted from clients, refused ones included.
    pub accepted: u64,
    /// Accepted connections closed at once because new connections were
    /// refused (or the service could not be reached).
    pub refused: u64,
    /// Connections being forwarded now.
    pub live: u64,
    /// Bytes forwarded from clients to the service.
    pub bytes_to_upstream: u64,
    /// Bytes forwarded from the service to clients.
    pub bytes_to_client: u64,
}

/// What connections watch for: a change ends or holds them.
#[derive(Debug, Clone, Copy, Default)]
struct Control {
    /// New connections are closed at once.
    refusing: bool,
    /// Bytes are held where they are.
    paused: bool,
    /// Bumped by `cut`: connections older than the bump close.
    cuts: u64,
    /// Bumped by `reset`: connections older than the bump are reset.
    resets: u64,
    /// The proxy was dropped.
    closed: bool,
}

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    control: watch::Sender<Control>,
    latency_to_upstream_nanos: AtomicU64,
    latency_to_client_nanos: AtomicU64,
    /// Bytes left to the next response before it is cut; [`NO_CUT`] if none.
    cut_after: AtomicUsize,
    accepted: AtomicU64,
    refused: AtomicU64,
    live: AtomicU64,
    bytes_to_upstream: AtomicU64,
    bytes_to_client: AtomicU64,
}

impl Shared {
    fn latency(&self, direction: Direction) -> Duration {
        let nanos = match direction {
            Direction::ToUpstream => &self.latency_to_upstream_nanos,
            Direction::ToClient => &self.latency_to_client_nanos,
        };
        Duration::from_nanos(nanos.load(Ordering::Relaxed))
    }

    fn count(&self, direction: Direction, bytes: usize) {
        let counter = match direction {
            Direction::ToUpstream => &self.bytes_to_upstream,
            Direction::ToClient => &self.bytes_to_client,
        };
        counter.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Claims the armed response cut, if any: the first response to ask gets it.
    fn take_cut(&self) -> Option<usize> {
        match self.cut_after.swap(NO_CUT, Ordering::SeqCst) {
            NO_CUT => None,
            n => Some(n),
        }
    }
}

/// Switches the faults of a [`FaultProxy`]; cheap to clone and to move into
/// another task. The proxy stops when the [`FaultProxy`] is dropped, handles
/// or not.
#[derive(Debug, Clone)]
pub struct ProxyHandle {
    shared: Arc<Shared>,
}

impl ProxyHandle {
    /// Delays every chunk forwarded, both ways, by `latency` (zero: none).
    pub fn set_latency(&self, latency: Duration) {
        self.set_latency_on(Direction::ToUpstream, latency);
        self.set_latency_on(Direction::ToClient, latency);
    }

    /// Delays every chunk forwarded in `direction` by `latency` (zero: none).
    /// Each chunk read waits this long before it is written on, so a
    /// request or response that fits in one chunk arrives `latency` late.
    pub fn set_latency_on(&self, direction: Direction, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        let slot = match direction {
            Direction::ToUpstream => &self.shared.latency_to_upstream_nanos,
            Direction::ToClient => &self.shared.latency_to_client_nanos,
        };
        slot.store(nanos, Ordering::Relaxed);
    }

    /// New connections are accepted and reset at once, as by a service that
    /// is down; live connections carry on.
    pub fn refuse(&self) {
        self.shared.control.send_modify(|c| c.refusing = true);
    }

    /// New connections are forwarded again (after [`refuse`](Self::refuse)
    /// or [`cut`](Self::cut)).
    pub fn accept(&self) {
        self.shared.control.send_modify(|c| c.refusing = false);
    }

    /// Closes every live connection now, on both sides, and refuses new ones
    /// until [`restore`](Self::restore) or [`accept`](Self::accept).
    pub fn cut(&self) {
        self.shared.control.send_modify(|c| {
            c.refusing = true;
            c.cuts += 1;
        });
    }

    /// Resets every live connection now, on both sides (a TCP RST: the
    /// client's next read fails with `ConnectionReset`). Connections made
    /// afterwards are not affected.
    pub fn reset(&self) {
        self.shared.control.send_modify(|c| c.resets += 1);
    }

    /// Cuts the next response from the service after `after_bytes` bytes:
    /// the client gets those bytes, then the end of the stream, and the
    /// connection is closed. Once; a later call re-arms it.
    pub fn cut_mid_response(&self, after_bytes: usize) {
        // `NO_CUT` itself would mean "no cut"; one byte less is as good as never.
        self.shared
            .cut_after
            .store(after_bytes.min(NO_CUT - 1), Ordering::SeqCst);
    }

    /// Stops all traffic: bytes are held (at most one chunk each way per
    /// connection, the rest waits in the sockets) and connections stay open.
    pub fn pause(&self) {
        self.shared.control.send_modify(|c| c.paused = true);
    }

    /// Lets held bytes and new ones flow again.
    pub fn resume(&self) {
        self.shared.control.send_modify(|c| c.paused = false);
    }

    /// Every fault off: connections accepted, traffic flowing, no latency, no
    /// armed response cut.
    pub fn restore(&self) {
        self.set_latency(Duration::ZERO);
        self.shared.cut_after.store(NO_CUT, Ordering::SeqCst);
        self.shared.control.send_modify(|c| {
            c.refusing = false;
            c.paused = false;
        });
    }

    /// The counters so far.
    pub fn stats(&self) -> ProxyStats {
        let s = &self.shared;
        ProxyStats {
            accepted: s.accepted.load(Ordering::Relaxed),
            refused: s.refused.load(Ordering::Relaxed),
            live: s.live.load(Ordering::Relaxed),
            bytes_to_upstream: s.bytes_to_upstream.load(Ordering::Relaxed),
            bytes_to_client: s.bytes_to_client.load(Ordering::Relaxed),
        }
    }

    /// The service the proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }
}

/// A TCP proxy on `127.0.0.1` in front of one service, with faults to switch
/// on and off (the methods of [`ProxyHandle`], which it dereferences to).
///
/// It runs on the tokio runtime it was started in. Dropping it closes its
/// port and every connection through it.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    handle: ProxyHandle,
    accepting: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free port of `127.0.0.1` and forwards every connection
    /// to `upstream`.
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let (control, _) = watch::channel(Control::default());
        let shared = Arc::new(Shared {
            upstream,
            control,
            latency_to_upstream_nanos: AtomicU64::new(0),
            latency_to_client_nanos: AtomicU64::new(0),
            cut_after: AtomicUsize::new(NO_CUT),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            live: AtomicU64::new(0),
            bytes_to_upstream: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
        });
        let accepting = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(FaultProxy {
            addr,
            handle: ProxyHandle { shared },
            accepting,
        })
    }

    /// Where clients connect instead of the service.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `scheme://127.0.0.1:PORT`, as an endpoint URL for clients:
    /// `url_for("http")` for an HTTP service.
    pub fn url_for(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }

    /// A handle to switch faults from elsewhere.
    pub fn handle(&self) -> ProxyHandle {
        self.handle.clone()
    }
}

impl std::ops::Deref for FaultProxy {
    type Target = ProxyHandle;

    fn deref(&self) -> &ProxyHandle {
        &self.handle
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accepting.abort();
        self.handle.shared.control.send_modify(|c| c.closed = true);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        // One snapshot: a cut or reset after it has a higher count than the
        // connection records, so the connection sees it.
        let control = *shared.control.borrow();
        if control.closed {
            return;
        }
        if control.refusing {
            shared.refused.fetch_add(1, Ordering::Relaxed);
            abort(&stream);
            continue;
        }
        let born = Born {
            cuts: control.cuts,
            resets: control.resets,
        };
        tokio::spawn(serve(stream, shared.clone(), born));
    }
}

/// The fault counts when a connection was accepted.
#[derive(Debug, Clone, Copy)]
struct Born {
    cuts: u64,
    resets: u64,
}

/// Why forwarding in one direction stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The sender finished; the end was passed on.
    Eof,
    /// Closed on purpose: `cut`, a cut response, the proxy dropped.
    Close,
    /// Reset on purpose, or one side failed.
    Reset,
}

/// Closes `stream` with a reset rather than an orderly end.
fn abort(stream: &TcpStream) {
    // Without the option the close is merely orderly: still a close.
    let _ = stream.set_zero_linger();
}

/// Resolves when a fault ends the connection.
async fn stopped(control: &mut watch::Receiver<Control>, born: Born) -> End {
    loop {
        if let Some(end) = ending(&control.borrow_and_update(), born) {
            return end;
        }
        if control.changed().await.is_err() {
            return End::Close;
        }
    }
}

fn ending(control: &Control, born: Born) -> Option<End> {
    if control.resets != born.resets {
        Some(End::Reset)
    } else if control.closed || control.cuts != born.cuts {
        Some(End::Close)
    } else {
        None
    }
}

/// Resolves when traffic may flow, or with the fault that ends the connection.
async fn flowing(control: &mut watch::Receiver<Control>, born: Born) -> Result<(), End> {
    loop {
        let now = *control.borrow_and_update();
        if let Some(end) = ending(&now, born) {
            return Err(end);
        }
        if !now.paused {
            return Ok(());
        }
        if control.changed().await.is_err() {
            return Err(End::Close);
        }
    }
}

/// Counts a live connection while it lives.
struct Live<'a>(&'a AtomicU64);

impl<'a> Live<'a> {
    fn new(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for Live<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve(mut client: TcpStream, shared: Arc<Shared>, born: Born) {
    let mut control = shared.control.subscribe();
    let connected = tokio::select! {
        end = stopped(&mut control, born) => {
            if end == End::Reset {
                abort(&client);
            }
            return;
        }
        connected = TcpStream::connect(shared.upstream) => connected,
    };
    let Ok(mut upstream) = connected else {
        // The service is down: the client sees what it would have seen.
        shared.refused.fetch_add(1, Ordering::Relaxed);
        abort(&client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let _live = Live::new(&shared.live);

    let end = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        let requests = pump(
            client_read,
            upstream_write,
            Direction::ToUpstream,
            &shared,
            shared.control.subscribe(),
            born,
        );
        let responses = pump(
            upstream_read,
            client_write,
            Direction::ToClient,
            &shared,
            shared.control.subscribe(),
            born,
        );
        tokio::pin!(requests, responses);
        let (mut requests_done, mut responses_done) = (false, false);
        loop {
            let end = tokio::select! {
                end = &mut requests, if !requests_done => {
                    requests_done = true;
                    end
                }
                end = &mut responses, if !responses_done => {
                    responses_done = true;
                    end
                }
            };
            if end != End::Eof {
                break end;
            }
            if requests_done && responses_done {
                break End::Eof;
            }
        }
    };
    match end {
        End::Eof => {}
        End::Close => {
            let _ = client.shutdown().await;
            let _ = upstream.shutdown().await;
        }
        End::Reset => {
            abort(&client);
            abort(&upstream);
        }
    }
}

/// Forwards one direction chunk by chunk, applying the faults, until either
/// side ends or a fault ends the connection.
///
/// Latency is a delay line, as a long cable would be: each chunk leaves
/// `latency` after it arrived, however many chunks a response takes, so a
/// request or response is `latency` late, not `latency` per chunk.
async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    direction: Direction,
    shared: &Shared,
    mut control: watch::Receiver<Control>,
    born: Born,
) -> End {
    let mut buf = vec![0u8; CHUNK_BYTES];
    // Chunks read and not yet forwarded, with when they arrived; bounded.
    let mut in_flight: VecDeque<(tokio::time::Instant, Vec<u8>)> = VecDeque::new();
    let mut eof = false;
    // Bytes of this connection's response left before it is cut.
    let mut cut_after: Option<usize> = None;
    loop {
        if eof && in_flight.is_empty() {
            let _ = to.shutdown().await;
            return End::Eof;
        }
        if let Err(end) = flowing(&mut control, born).await {
            return end;
        }
        let due = in_flight
            .front()
            .map(|(arrived, _)| *arrived + shared.latency(direction));
        let can_read = !eof && in_flight.len() < MAX_IN_FLIGHT;
        tokio::select! {
            biased;
            end = stopped(&mut control, born) => return end,
            () = sleep_until_some(due) => {}
            read = from.read(&mut buf), if can_read => {
                match read {
                    Ok(0) => eof = true,
                    Ok(n) => in_flight.push_back((tokio::time::Instant::now(), buf[..n].to_vec())),
                    Err(_) => return End::Reset,
                }
                continue;
            }
        }
        let Some((_, data)) = in_flight.pop_front() else {
            continue;
        };
        // Paused after the delay: the chunk is held here.
        if let Err(end) = flowing(&mut control, born).await {
            return end;
        }
        let mut chunk = &data[..];
        let mut cut_now = false;
        if direction == Direction::ToClient {
            if cut_after.is_none() {
                cut_after = shared.take_cut();
            }
            if let Some(left) = cut_after.as_mut() {
                if chunk.len() >= *left {
                    chunk = &chunk[..*left];
                    cut_now = true;
                } else {
                    *left -= chunk.len();
                }
            }
        }
        let written = tokio::select! {
            end = stopped(&mut control, born) => return end,
            written = to.write_all(chunk) => written,
        };
        if written.is_err() {
            return End::Reset;
        }
        shared.count(direction, chunk.len());
        if cut_now {
            return End::Close;
        }
    }
}

/// Chunks held in one direction of one connection at most.
const MAX_IN_FLIGHT: usize = 8;

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
