//! Accept loops and per-connection tasks: the connection cap, TLS handshakes, HTTP/1.1 + h2c/h2 via
//! hyper-util's auto builder, idle timeouts and graceful shutdown.
//!
//! One task per connection. Each response body is wrapped so the connection knows a request is
//! in flight (idle timeouts never cut a stream that is waiting for its next token), and every byte
//! moved marks the connection active. Over the connection cap a connection is still accepted, gets
//! an HTTP 503 from [`HttpHandler::overloaded`] and is closed, all within a few seconds at most.
//!
//! What a client can hold without sending anything is bounded: one client address (an IPv6 /64)
//! keeps at most [`HttpOptions::max_connections_per_ip`] connections (one more is closed as soon
//! as it is accepted, before it costs a task), a connection must deliver its first request head
//! within [`HttpOptions::header_read_timeout`] of being accepted (TLS handshake included), and a
//! connection whose socket takes no byte of a response for the write timeout
//! ([`NetServer::with_write_timeout`]) is closed, which drops (cancels) what it was answering.
//!
//! No connections are kept in reserve for administrators: the caps apply when a connection is
//! accepted, before any byte says who it is, so idle sockets would fill a reserve exactly as they
//! fill the pool. What keeps `/metrics` reachable under a flood of idle sockets is that one
//! address cannot take more than its share and a silent socket is gone after the header timeout.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Notify};

use super::listener::{secs_opt, tune_accepted, BindAddr, Listener, SocketOptions};
use crate::error::{Error, Result};

/// HTTP limits and timeouts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpOptions {
    /// Open connections at most; one more gets a 503 and is closed.
    pub max_connections: usize,
    /// Open TCP connections from one client address at most (IPv6: from one /64); one more is
    /// closed as soon as it is accepted, without an answer. `None`: half of `max_connections`.
    /// Behind a proxy every client has the proxy's address: give `max_connections` there.
    pub max_connections_per_ip: Option<usize>,
    /// Bytes of request head (HTTP/1 read buffer, at least 8192; HTTP/2 header list). Larger heads
    /// get a 431.
    pub max_header_bytes: usize,
    /// Header fields per HTTP/1 request.
    pub max_headers: usize,
    /// Time a client has to send a complete request head: the first one counted from the moment
    /// the connection is accepted (TLS handshake included), so a socket that sends nothing is
    /// closed after it; later HTTP/1 heads by hyper's timer.
    #[serde(with = "secs_opt")]
    pub header_read_timeout: Option<Duration>,
    /// A connection with no request in flight and no bytes moved for this long is closed.
    #[serde(with = "secs_opt")]
    pub idle_timeout: Option<Duration>,
    /// Time a client has to complete the TLS handshake.
    #[serde(with = "secs_opt")]
    pub tls_handshake_timeout: Option<Duration>,
    /// Concurrent streams per HTTP/2 connection.
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2 PING interval to detect dead peers; `None` disables.
    #[serde(with = "secs_opt")]
    pub http2_keepalive_interval: Option<Duration>,
}

impl HttpOptions {
    /// The per-address cap in effect: [`max_connections_per_ip`](Self::max_connections_per_ip),
    /// or half of `max_connections` (at least 1).
    pub fn per_ip_cap(&self) -> usize {
        self.max_connections_per_ip
            .unwrap_or(self.max_connections.div_ceil(2))
            .max(1)
    }
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            max_connections: 10_000,
            max_connections_per_ip: None,
            max_header_bytes: 64 << 10,
            max_headers: 100,
            header_read_timeout: Some(Duration::from_secs(30)),
            idle_timeout: Some(Duration::from_secs(120)),
            tls_handshake_timeout: Some(Duration::from_secs(10)),
            http2_max_concurrent_streams: 1024,
            http2_keepalive_interval: Some(Duration::from_secs(30)),
        }
    }
}

/// What a connection tells the application about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// The peer's address; `None` on Unix sockets.
    pub peer: Option<SocketAddr>,
    /// Whether the connection is TLS.
    pub tls: bool,
}

/// The application behind the listeners.
pub trait HttpHandler: Clone + Send + Sync + 'static {
    /// Response body type.
    type Body: Body<Data = Bytes, Error = Infallible> + Send + Unpin + 'static;
    /// Answers one request (on a clone of the handler, so the future borrows nothing).
    fn handle(
        self,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> impl Future<Output = Response<Self::Body>> + Send + 'static;
    /// The answer to every request on a connection over the cap (a 503).
    fn overloaded(&self) -> Response<Self::Body>;
}

/// Lifecycle of the server, watched by every acceptor and connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// Stop accepting; finish what is in flight, then close.
    Draining,
    /// Close everything now.
    Closed,
}

/// Counters shared with whoever reports metrics.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Connections open now (including ones being turned away).
    pub open_connections: AtomicUsize,
    /// Connections turned away with a 503 because of the cap.
    pub rejected_connections: AtomicUsize,
    /// Connections closed on accept because their address had its share open.
    pub rejected_per_address: AtomicUsize,
    /// Connections closed because no request head came within the header timeout of accept.
    pub header_timeouts: AtomicUsize,
    /// Connections closed because their socket took no byte for the write timeout.
    pub write_timeouts: AtomicUsize,
}

/// Where a client connects from, for the per-address cap: an IPv4 address (IPv4-mapped IPv6
/// included) or an IPv6 /64, which one client usually has whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum AddressKey {
    V4(u32),
    V6(u64),
}

impl AddressKey {
    fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(a) => AddressKey::V4(a.into()),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => AddressKey::V4(v4.into()),
                None => AddressKey::V6((u128::from(a) >> 64) as u64),
            },
        }
    }
}

/// Open connections per client address.
#[derive(Debug, Default)]
struct PerAddress {
    // The default (randomly keyed) hasher: the keys are the clients' choice.
    open: Mutex<HashMap<AddressKey, usize>>,
}

impl PerAddress {
    /// Counts one more connection from `ip`, unless it has `cap` open already.
    fn claim(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<AddressSlot> {
        let key = AddressKey::of(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(AddressSlot(self.clone(), key))
    }
}

/// One connection's place in its address's count; given back on drop.
struct AddressSlot(Arc<PerAddress>, AddressKey);

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.0.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.1);
            }
        }
    }
}

struct Inner<H> {
    handler: H,
    http: HttpOptions,
    socket: SocketOptions,
    builder: auto::Builder<TokioExecutor>,
    reject_builder: auto::Builder<TokioExecutor>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stats: Arc<NetStats>,
    phase: watch::Sender<Phase>,
    all_closed: Notify,
    per_address: Arc<PerAddress>,
    /// Close a connection whose socket takes no byte of a response for this long.
    write_timeout: Option<Duration>,
}

/// Bound listeners plus the application, ready to [`run`](NetServer::run).
pub struct NetServer<H: HttpHandler> {
    inner: Arc<Inner<H>>,
    listeners: Vec<Listener>,
}

impl<H: HttpHandler> NetServer<H> {
    /// Binds every address (one socket per acceptor with `SO_REUSEPORT`). Must run inside a tokio
    /// runtime. `tls` applies to every TCP and Unix listener.
    pub fn bind(
        addrs: &[BindAddr],
        socket: SocketOptions,
        http: HttpOptions,
        tls: Option<Arc<rustls::ServerConfig>>,
        handler: H,
    ) -> Result<Self> {
        if addrs.is_empty() {
            return Err(Error::config("listen", "no address to listen on"));
        }
        let mut listeners = Vec::new();
        for a in addrs {
            listeners.extend(super::listener::bind(a, &socket)?);
        }
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .max_buf_size(http.max_header_bytes.max(8192))
            .max_headers(http.max_headers)
            .header_read_timeout(http.header_read_timeout)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(http.max_header_bytes.min(u32::MAX as usize) as u32)
            .max_concurrent_streams(http.http2_max_concurrent_streams)
            .keep_alive_interval(http.http2_keepalive_interval);
        let mut reject_builder = auto::Builder::new(TokioExecutor::new());
        reject_builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(2))
            .keep_alive(false);
        Ok(NetServer {
            inner: Arc::new(Inner {
                handler,
                http,
                socket,
                builder,
                reject_builder,
                tls: tls.map(tokio_rustls::TlsAcceptor::from),
                stats: Arc::default(),
                phase: watch::Sender::new(Phase::Running),
                all_closed: Notify::new(),
                per_address: Arc::default(),
                write_timeout: None,
            }),
            listeners,
        })
    }

    /// Closes a connection once its socket has taken no byte of a response for `timeout` (a
    /// client that stopped reading): whatever it was answering is dropped, so a stream's request
    /// is cancelled and everything it held is freed. `None` (the default) waits forever.
    pub fn with_write_timeout(mut self, timeout: Option<Duration>) -> Self {
        // Only `run` shares the state, so before it this always holds.
        let inner = Arc::get_mut(&mut self.inner);
        debug_assert!(inner.is_some(), "the server state is not shared before run");
        if let Some(inner) = inner {
            inner.write_timeout = timeout;
        }
        self
    }

    /// The addresses bound (ports resolved), one per listening socket.
    pub fn local_addrs(&self) -> Vec<BindAddr> {
        let mut out: Vec<BindAddr> = self
            .listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        out.dedup();
        out
    }

    /// Connection counters.
    pub fn stats(&self) -> Arc<NetStats> {
        self.inner.stats.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting, lets open requests finish for up
    /// to `grace`, closes what is left and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>, grace: Duration) {
        self.run_with(shutdown, grace, || ()).await
    }

    /// [`run`](NetServer::run), calling `at_grace_end` when `grace` has passed with connections
    /// still open: the application can end its responses then (a stream's final event), and gets
    /// up to 2 s for them to be written before the connections are closed.
    pub async fn run_with(
        self,
        shutdown: impl Future<Output = ()>,
        grace: Duration,
        at_grace_end: impl FnOnce(),
    ) {
        let unix_paths: Vec<_> = self
            .listeners
            .iter()
            .filter_map(|l| match l.local_addr() {
                Ok(BindAddr::Unix(p)) => {
                    let id = super::listener::socket_file_id(&p);
                    Some((p, id))
                }
                _ => None,
            })
            .collect();
        let mut acceptors = Vec::new();
        for l in self.listeners {
            acceptors.push(tokio::spawn(accept_loop(self.inner.clone(), l)));
        }
        shutdown.await;
        self.inner.phase.send_replace(Phase::Draining);
        for a in acceptors {
            let _ = a.await;
        }
        for (p, id) in unix_paths {
            super::listener::remove_own_socket(&p, id);
        }
        if tokio::time::timeout(grace, self.inner.wait_closed())
            .await
            .is_err()
        {
            at_grace_end();
            let _ = tokio::time::timeout(Duration::from_secs(2), self.inner.wait_closed()).await;
        }
        self.inner.phase.send_replace(Phase::Closed);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.inner.wait_closed()).await;
    }
}

enum Accepted {
    Tcp(tokio::net::TcpStream, SocketAddr),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Listener) -> io::Result<Accepted> {
    match l {
        Listener::Tcp(l) => l.accept().await.map(|(s, a)| Accepted::Tcp(s, a)),
        Listener::Unix(l) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
    }
}

async fn accept_loop<H: HttpHandler>(inner: Arc<Inner<H>>, listener: Listener) {
    let mut phase = inner.phase.subscribe();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = phase.wait_for(|p| *p != Phase::Running) => return,
            r = accept(&listener) => r,
        };
        match accepted {
            Ok(Accepted::Tcp(s, peer)) => {
                let cap = inner.http.per_ip_cap();
                let Some(slot) = inner.per_address.claim(peer.ip(), cap) else {
                    // Its address has its share open: close now, before it costs a task, a
                    // place under the global cap or a response.
                    inner
                        .stats
                        .rejected_per_address
                        .fetch_add(1, Ordering::Relaxed);
                    drop(s);
                    continue;
                };
                // A failed option is not worth dropping the client for.
                let _ = tune_accepted(&s, &inner.socket);
                let info = ConnInfo {
                    peer: Some(peer),
                    tls: false,
                };
                inner.clone().spawn_connection(s, info, Some(slot));
            }
            Ok(Accepted::Unix(s)) => {
                let info = ConnInfo {
                    peer: None,
                    tls: false,
                };
                inner.clone().spawn_connection(s, info, None);
            }
            Err(e) => {
                // Out of descriptors or memory: back off instead of spinning on the error; other
                // errors (a peer that reset before accept) concern one connection only.
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                ) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}

/// Decrements the open-connection count when a connection task ends.
struct OpenGuard<H: HttpHandler>(Arc<Inner<H>>);

impl<H: HttpHandler> Drop for OpenGuard<H> {
    fn drop(&mut self) {
        if self.0.stats.open_connections.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.all_closed.notify_waiters();
        }
    }
}

impl<H: HttpHandler> Inner<H> {
    async fn wait_closed(&self) {
        loop {
            let notified = self.all_closed.notified();
            if self.stats.open_connections.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    fn spawn_connection<I>(self: Arc<Self>, io: I, mut info: ConnInfo, slot: Option<AddressSlot>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let accepted = Instant::now();
        let open = self.stats.open_connections.fetch_add(1, Ordering::AcqRel) + 1;
        let over = open > self.http.max_connections;
        let guard = OpenGuard(self.clone());
        tokio::spawn(async move {
            let _guard = guard;
            let _slot = slot;
            if over {
                self.stats
                    .rejected_connections
                    .fetch_add(1, Ordering::Relaxed);
            }
            match &self.tls {
                Some(acceptor) => {
                    // Within the handshake timeout, and within the header timeout too: that one
                    // counts from accept.
                    let limit = [
                        self.http.tls_handshake_timeout,
                        self.http.header_read_timeout,
                    ]
                    .into_iter()
                    .flatten()
                    .min()
                    .unwrap_or(Duration::from_secs(3600));
                    let Ok(Ok(tls)) = tokio::time::timeout(limit, acceptor.accept(io)).await else {
                        return;
                    };
                    info.tls = true;
                    self.serve(tls, info, over, accepted).await
                }
                None => self.serve(io, info, over, accepted).await,
            }
        });
    }

    async fn serve<I>(&self, io: I, info: ConnInfo, over: bool, accepted: Instant)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::new(self.write_timeout.is_some()));
        let io = TokioIo::new(Tracked {
            inner: io,
            activity: activity.clone(),
        });
        if over {
            return self.reject(io).await;
        }
        let handler = self.handler.clone();
        let info = Arc::new(info);
        let svc_activity = activity.clone();
        let svc = service_fn(move |req| {
            let busy = BusyGuard::new(svc_activity.clone());
            let fut = handler.clone().handle(req, info.clone());
            async move {
                let resp = fut.await;
                Ok::<_, Infallible>(resp.map(|body| Guarded { body, _busy: busy }))
            }
        });
        let conn = self.builder.serve_connection(io, svc);
        tokio::pin!(conn);
        let mut phase = self.phase.subscribe();
        if *phase.borrow_and_update() != Phase::Running {
            conn.as_mut().graceful_shutdown();
        }
        let idle = self.http.idle_timeout;
        let mut tick = tokio::time::interval(idle.unwrap_or(Duration::from_secs(3600)));
        tick.tick().await;
        // The first request head is due this long after accept (hyper's own timer starts only
        // once bytes arrive, so a socket that sends nothing would never meet it).
        let mut first_head = self
            .http
            .header_read_timeout
            .map(|t| Box::pin(tokio::time::sleep_until((accepted + t).into())));
        let write_timeout = self.write_timeout;
        // Armed while a write waits for the socket: when it would run out.
        let mut stall: Option<Pin<Box<tokio::time::Sleep>>> = None;
        loop {
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = async { first_head.as_mut().expect("guarded").await }, if first_head.is_some() => {
                    if !activity.requested.load(Ordering::Relaxed) {
                        self.stats.header_timeouts.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    first_head = None;
                }
                _ = activity.write_blocked.notified(), if write_timeout.is_some() && stall.is_none() => {
                    if let (Some(at), Some(t)) = (activity.blocked_since(), write_timeout) {
                        stall = Some(Box::pin(tokio::time::sleep_until((at + t).into())));
                    }
                }
                _ = async { stall.as_mut().expect("guarded").await }, if stall.is_some() => {
                    let t = write_timeout.unwrap_or(Duration::MAX);
                    match activity.blocked_since() {
                        Some(at) if at.elapsed() >= t => {
                            // The client stopped reading: drop the connection and with it the
                            // responses it holds (their requests are cancelled).
                            self.stats.write_timeouts.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        Some(at) => stall = Some(Box::pin(tokio::time::sleep_until((at + t).into()))),
                        None => stall = None,
                    }
                }
                changed = phase.changed() => {
                    let now = *phase.borrow_and_update();
                    if changed.is_err() || now == Phase::Closed {
                        return;
                    }
                    if now == Phase::Draining {
                        conn.as_mut().graceful_shutdown();
                    }
                }
                _ = tick.tick(), if idle.is_some() => {
                    let touched = activity.touched.swap(false, Ordering::Relaxed);
                    if !touched && activity.busy.load(Ordering::Relaxed) == 0 {
                        return;
                    }
                }
            }
        }
    }

    /// Answers every request on the connection with the handler's 503, then closes it.
    async fn reject<I>(&self, io: TokioIo<Tracked<I>>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let answered = Arc::new(Notify::new());
        let handler = self.handler.clone();
        let signal = answered.clone();
        let svc = service_fn(move |_req| {
            signal.notify_one();
            std::future::ready(Ok::<_, Infallible>(handler.overloaded()))
        });
        let conn = self.reject_builder.serve_connection(io, svc);
        tokio::pin!(conn);
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = answered.notified() => {
                    // HTTP/1 closes by itself (keep-alive off); HTTP/2 gets a GOAWAY after this
                    // stream.
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.as_mut().await;
                }
            }
        })
        .await;
    }
}

/// Whether a connection has a request in flight or moved bytes lately, and whether its socket
/// is refusing writes.
#[derive(Debug)]
struct Activity {
    busy: AtomicUsize,
    touched: AtomicBool,
    /// A request has arrived.
    requested: AtomicBool,
    /// Whether to track `blocked_at`.
    track_writes: bool,
    /// Since when a write has waited for the socket: nanoseconds after `epoch`, plus one; 0
    /// while writes go through.
    blocked_at: AtomicU64,
    epoch: Instant,
    /// Notified when a write starts waiting.
    write_blocked: Notify,
}

impl Activity {
    fn new(track_writes: bool) -> Self {
        Activity {
            busy: AtomicUsize::new(0),
            touched: AtomicBool::new(true),
            requested: AtomicBool::new(false),
            track_writes,
            blocked_at: AtomicU64::new(0),
            epoch: Instant::now(),
            write_blocked: Notify::new(),
        }
    }

    /// A write found the socket full.
    fn write_pending(&self) {
        if !self.track_writes || self.blocked_at.load(Ordering::Relaxed) != 0 {
            return;
        }
        let at = (self.epoch.elapsed().as_nanos() as u64).saturating_add(1);
        if self
            .blocked_at
            .compare_exchange(0, at, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.write_blocked.notify_one();
        }
    }

    /// A write went through.
    fn wrote(&self) {
        if self.blocked_at.load(Ordering::Relaxed) != 0 {
            self.blocked_at.store(0, Ordering::Relaxed);
        }
    }

    /// When the write waiting now started to wait.
    fn blocked_since(&self) -> Option<Instant> {
        match self.blocked_at.load(Ordering::Relaxed) {
            0 => None,
            at => Some(self.epoch + Duration::from_nanos(at - 1)),
        }
    }
}

struct BusyGuard(Arc<Activity>);

impl BusyGuard {
    fn new(a: Arc<Activity>) -> Self {
        a.busy.fetch_add(1, Ordering::Relaxed);
        a.requested.store(true, Ordering::Relaxed);
        BusyGuard(a)
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.touched.store(true, Ordering::Relaxed);
    }
}

/// A response body that keeps its request counted as in flight until it is done or dropped.
struct Guarded<B> {
    body: B,
    _busy: BusyGuard,
}

impl<B: Body + Unpin> Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// An I/O object that marks its connection active whenever bytes move.
struct Tracked<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I> Tracked<I> {
    fn touch<T>(&self, r: &Poll<io::Result<T>>) {
        if matches!(r, Poll::Ready(Ok(_))) {
            self.activity.touched.store(true, Ordering::Relaxed);
        }
    }

    /// Notes whether a write went through or waits for the socket.
    fn track_write(&self, r: &Poll<io::Result<usize>>) {
        match r {
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.activity.touched.store(true, Ordering::Relaxed);
                self.activity.wrote();
            }
            Poll::Ready(_) => {}
            Poll::Pending => self.activity.write_pending(),
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.touch(&r);
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.track_write(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.track_write(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        match &r {
            Poll::Ready(Ok(())) => self.activity.wrote(),
            Poll::Ready(Err(_)) => {}
            Poll::Pending => self.activity.write_pending(),
        }
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
