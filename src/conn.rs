//! The loop a client connection lives in between requests.
//!
//! Pingora's own HTTP/1 loop starts the whole proxy task for the next request (a boxed future
//! of about 13 KiB, a session and a 4 KiB header buffer) as soon as the previous one is done,
//! and holds it while the connection sits idle, with no time limit after the first request.
//! Its accept task also stays alive for the connection's life, with room for a TLS handshake
//! inline (about 7 KiB), plain listeners too. At month-end thousands of Odoo tabs keep a
//! connection open; here each HTTP/1 connection gets a small task of its own, which waits for
//! the next request holding only the socket (a plain socket until it is readable, reading
//! nothing; a TLS stream for its first decrypted byte, which goes in front of the request
//! head). Then it reads what the client sent, without waiting for more: a whole head with at
//! most a short body after it is served by erpgate's own loop ([`crate::fast`], which reads
//! the rest of the body); anything else goes to Pingora's proxy, which parses the same bytes
//! first. An idle connection is closed after
//! `[server] keepalive_timeout`; on shutdown an idle keep-alive connection is closed at once,
//! while a new one still gets its first request answered. HTTP/2 connections (TLS with ALPN
//! h2) take Pingora's own path.
//!
//! Each HTTP/1 connection is served by the proxy thread serving the fewest, and a plain
//! socket is registered with that thread's event loop, not the accepting one's.

use crate::config::Config;
use crate::proxy::ErpGate;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::BytesMut;
use futures_util::FutureExt;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream, ServerApp};
use pingora::listeners::ConnectionFilter;
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, SocketDigest, Stream, ALPN};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use rustix::process::{getpid, pidfd_getfd, pidfd_open, PidfdFlags, PidfdGetfdFlags};
use std::cell::Cell;
use std::future::Future;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

pub struct Connections {
    proxy: Arc<HttpProxy<ErpGate>>,
    /// The same proxy, for the requests erpgate serves itself ([`crate::fast`]).
    gate: ErpGate,
    store: Arc<ArcSwap<Config>>,
}

impl Connections {
    pub fn new(proxy: HttpProxy<ErpGate>, gate: ErpGate, store: Arc<ArcSwap<Config>>) -> Self {
        Connections {
            proxy: Arc::new(proxy),
            gate,
            store,
        }
    }

    fn keepalive(&self) -> Duration {
        self.store.load().server.keepalive_timeout
    }

    /// Serves an HTTP/1 connection until it closes, waiting between requests with only the
    /// socket.
    async fn serve_http1(self: Arc<Self>, mut stream: Stream, shutdown: ShutdownWatch) {
        let mut carried: Option<HttpPersistentSettings> = None;
        let mut fresh = true;
        // One wait for the stop for all the connection's keep-alive waits: it stays registered
        // with the shutdown signal between them (registering and unregistering it for each
        // request took the signal's lock, which all threads share, twice more).
        let mut stop = shutdown.clone();
        let mut stopping = std::pin::pin!(stop.wait_for(|stopping| *stopping));
        loop {
            // Before each request (and so after the one before it): the CPU to a sibling
            // thread waiting for it, at most once a turn.
            take_turns();
            let idle = self.keepalive();
            let Some(first) = next_request(&mut stream, idle, stopping.as_mut(), fresh).await
            else {
                return;
            };
            fresh = false;
            // What the client sent so far, without waiting for more: a whole simple request
            // is served by erpgate's own loop, anything else by Pingora's proxy, which parses
            // these bytes first.
            // At least 4 KiB (Pingora's own initial size), one this thread kept if it has one.
            let mut head = crate::fast::buffer();
            head.extend_from_slice(first.as_slice());
            match stream.read_buf(&mut head).now_or_never() {
                Some(Ok(0)) if head.is_empty() => return,
                Some(Err(_)) => return,
                _ => {}
            }
            // Boxed, either way: the connection's task keeps no room for a request while it
            // waits.
            let head = head.freeze();
            if let Some(request) = crate::fast::request(&head) {
                let serving: Pin<Box<dyn Future<Output = Option<Stream>> + Send + '_>> =
                    Box::pin(crate::fast::serve(&self.gate, stream, request));
                let next = serving.await;
                // Nothing refers to the head now: its buffer serves the next request.
                if let Ok(buf) = head.try_into_mut() {
                    crate::fast::put_back(buf);
                }
                match next {
                    Some(next) => stream = next,
                    None => return,
                }
                continue;
            }
            // Nothing holds a part of it any more: the same buffer, not a copy.
            let head = head
                .try_into_mut()
                .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
            let session = self.session(stream, carried.take(), head, idle);
            let serving: Serving<'_> = Box::pin(self.proxy.process_new_http(session, &shutdown));
            let Some(reused) = serving.await else {
                return;
            };
            let (next, settings) = reused.consume();
            stream = next;
            carried = settings;
        }
    }
}

/// A request being served, boxed: the connection's task keeps no room for it while waiting.
type Serving<'a> = Pin<Box<dyn Future<Output = Option<ReusedHttpStream>> + Send + 'a>>;

impl Connections {
    /// The session of the next request: the connection's settings carried over (or the
    /// server's for a new connection), `head` (bytes read already) in front of what it reads.
    fn session(
        &self,
        stream: Stream,
        carried: Option<HttpPersistentSettings>,
        head: BytesMut,
        idle: Duration,
    ) -> ServerSession {
        let mut session = ServerSession::new_http1(stream);
        match carried {
            Some(settings) => settings.apply_to_session(&mut session),
            None => session.set_keepalive_reuses_remaining(
                self.proxy
                    .server_options()
                    .and_then(|o| o.keepalive_request_limit),
            ),
        }
        if !head.is_empty() {
            session.set_pipelined_prefix(head);
        }
        // The rest of the head must come within the same limit (Pingora would otherwise wait
        // for it without end on a reused connection).
        session.set_keepalive(Some(whole_secs(idle)));
        session
    }
}

/// Waits for the next request. `Some(Some(byte))`: the first byte of its head (read from a
/// TLS stream, where bytes come out of the decrypted buffer); `Some(None)` on a plain TCP
/// stream, which has no read buffer: it waits only until the socket is readable
/// ([`Readable`]) and the head is then read straight into the request's buffer, in one
/// `recv`. `None`: the client closed, the
/// connection broke, or it stayed idle for `idle`. On shutdown an idle keep-alive connection
/// is closed at once (bytes already there are still read first), but a new connection is
/// waited for: it was accepted before the listeners closed, and its first request is on its
/// way.
async fn next_request(
    stream: &mut Stream,
    idle: Duration,
    stop: Pin<&mut impl Future>,
    fresh: bool,
) -> Option<Option<u8>> {
    if stream.as_any().is::<L4Stream>() {
        let arrived = wait(Readable::new(stream), idle, stop, fresh).await;
        return arrived.then_some(None);
    }
    let mut byte = [0u8; 1];
    let arrived = wait(stream.read(&mut byte), idle, stop, fresh).await;
    arrived.then_some(Some(byte[0]))
}

/// Whether `read` got something within `idle` (and, unless the connection is `fresh`,
/// before erpgate began to stop).
async fn wait(
    read: impl Future<Output = std::io::Result<usize>>,
    idle: Duration,
    stop: Pin<&mut impl Future>,
    fresh: bool,
) -> bool {
    let read = crate::deadline::within(idle, read);
    let got = |r: Result<std::io::Result<usize>, _>| matches!(r, Ok(Ok(_)));
    if fresh {
        got(read.await)
    } else {
        tokio::select! {
            biased;
            r = read => got(r),
            _ = stop => false,
        }
    }
}

/// Waits until a plain socket is readable, reading nothing. The wait is an empty read, polled
/// once; the socket's readiness then wakes the task through [`Woken`], and that ends the
/// wait. Polling the empty read again would `recv` nothing: a system call per request.
struct Readable<'a> {
    stream: &'a mut Stream,
    woken: Option<Arc<Woken>>,
}

impl<'a> Readable<'a> {
    fn new(stream: &'a mut Stream) -> Self {
        Readable {
            stream,
            woken: None,
        }
    }
}

/// The waker the socket's readiness calls: notes it, and wakes the connection's task.
struct Woken {
    ready: AtomicBool,
    task: std::sync::Mutex<Waker>,
}

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.store(true, Ordering::Release);
        if let Ok(task) = self.task.lock() {
            task.wake_by_ref();
        }
    }
}

impl Future for Readable<'_> {
    type Output = std::io::Result<usize>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(woken) = &self.woken {
            if woken.ready.load(Ordering::Acquire) {
                return Poll::Ready(Ok(0));
            }
            // Polled for something else (the idle timer, the stop): still waiting.
            if let Ok(mut task) = woken.task.lock() {
                if !task.will_wake(cx.waker()) {
                    *task = cx.waker().clone();
                }
            }
            return Poll::Pending;
        }
        let woken = Arc::new(Woken {
            ready: AtomicBool::new(false),
            task: std::sync::Mutex::new(cx.waker().clone()),
        });
        let waker = Waker::from(woken.clone());
        let mut empty = [0u8; 0];
        let mut buf = ReadBuf::new(&mut empty);
        match Pin::new(&mut *self.stream).poll_read(&mut Context::from_waker(&waker), &mut buf) {
            Poll::Ready(r) => Poll::Ready(r.map(|()| 0)),
            Poll::Pending => {
                self.woken = Some(woken);
                Poll::Pending
            }
        }
    }
}

/// A thread of the proxy: its event loop, and how many client connections it serves.
struct Thread {
    handle: tokio::runtime::Handle,
    open: AtomicUsize,
    /// Where and when this thread last ended a turn ([`take_turns`], [`turn_note`]); 0 before
    /// its first.
    turn: AtomicU64,
}

/// The proxy's threads, each listed when it first got a connection from Pingora.
static THREADS: Mutex<Vec<Arc<Thread>>> = Mutex::new(Vec::new());

/// Counts a connection on its thread while it is open.
struct OpenOn(Arc<Thread>);

impl Drop for OpenOn {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// This thread, listed among the proxy's threads (with [`keep_a_timer`] started when it is
/// first listed: a connection is only ever given to a listed thread).
fn this_thread() -> Arc<Thread> {
    HERE.with(|here| {
        here.get_or_init(|| {
            keep_a_timer();
            let me = Arc::new(Thread {
                handle: tokio::runtime::Handle::current(),
                open: AtomicUsize::new(0),
                turn: AtomicU64::new(0),
            });
            let index = THREADS.lock().ok().map(|mut all| {
                all.push(me.clone());
                all.len() - 1
            });
            if let Some(index) = index.filter(|_| PIN.load(Ordering::Relaxed)) {
                pin_to_cpu(index);
            }
            me
        })
        .clone()
    })
}

/// `[server] pin_threads`: each proxy thread is pinned to a CPU when it is first listed.
static PIN: AtomicBool = AtomicBool::new(false);

/// Whether proxy threads are pinned to CPUs (`[server] pin_threads`, read at start).
pub fn pin_threads(on: bool) {
    PIN.store(on, Ordering::Relaxed);
}

/// Pins this thread to the `index`-th of the CPUs erpgate may run on (wrapping around when
/// there are more threads than CPUs). Unpinned, the kernel moved the two proxy threads from
/// CPU to CPU as it woke them for socket data: 1,409 moves in 5 s of wrk against nginx's 79
/// for its two workers, with 1.8 times nginx's context switches; pinned, erpgate served 3-21 %
/// more requests a second with less CPU per request (README, "Performance").
fn pin_to_cpu(index: usize) {
    use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};
    let allowed = match sched_getaffinity(None) {
        Ok(set) => set,
        Err(e) => {
            tracing::warn!("proxy thread {index} not pinned: sched_getaffinity: {e}");
            return;
        }
    };
    let count = (allowed.count() as usize).max(1);
    let Some(cpu) = (0..CpuSet::MAX_CPU)
        .filter(|&c| allowed.is_set(c))
        .nth(index % count)
    else {
        return;
    };
    let mut one = CpuSet::new();
    one.set(cpu);
    match sched_setaffinity(None, &one) {
        Ok(()) => tracing::info!("proxy thread {index} pinned to CPU {cpu}"),
        Err(e) => tracing::warn!("proxy thread {index} not pinned to CPU {cpu}: {e}"),
    }
}

/// Runs a client connection on the thread serving the fewest (this one on a tie). Pingora
/// hands each new connection to a thread picked at random: with 64 connections on 2
/// threads, splits such as 27 / 37 were seen, the busier thread's connections then waiting
/// longer for their turn.
/// A TLS connection (`movable` false) stays on this thread, where its handshake ran: its
/// socket is registered here ([`rehome_before_tls`]).
///
/// `serve` makes the connection's task from the count that holds its place on the thread: the
/// task holds it itself. (A task wrapping `serve`'s future would hold that future twice,
/// before and while it is awaited: 1 KiB more per idle connection, by idle_memory.)
fn spawn_on_least_busy<F>(movable: bool, serve: impl FnOnce(OpenOn) -> F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let here = this_thread();
    let other = THREADS.lock().ok().filter(|_| movable).and_then(|all| {
        let open = all.iter().map(|t| t.open.load(Ordering::Relaxed));
        let i = less_busy(open, here.open.load(Ordering::Relaxed))?;
        all.get(i).cloned()
    });
    let to = other.unwrap_or(here);
    to.open.fetch_add(1, Ordering::Relaxed);
    let open = OpenOn(to.clone());
    to.handle.spawn(serve(open));
}

/// Which of the threads (their open connections) serves fewer than this one's `here`: the
/// least busy, the first of them on a tie; `None`: none does.
fn less_busy(open: impl Iterator<Item = usize>, here: usize) -> Option<usize> {
    open.enumerate()
        .filter(|&(_, n)| n < here)
        .min_by_key(|&(i, n)| (n, i))
        .map(|(i, _)| i)
}

thread_local! {
    /// This thread among the proxy's threads (see [`spawn_on_least_busy`]).
    static HERE: std::cell::OnceCell<Arc<Thread>> = const { std::cell::OnceCell::new() };
    /// This thread runs the listeners' accept loops: the sockets they accept are registered
    /// with its event loop.
    static ACCEPTS: Cell<bool> = const { Cell::new(false) };
}

/// Keeps a timer due within a second on this thread's event loop. Tokio wakes its event loop
/// (an `eventfd` write, from the thread to itself) whenever a timer is set that is due before
/// every timer the loop last went to sleep with, or when it went to sleep with none; the
/// keep-alive waits set one per request, and with every connection of the thread busy with
/// a request when the loop went to sleep, each of them did (about 17,000 writes a second
/// under wrk, 0.27 per request). With this timer there, a keep-alive wait's timer (due
/// after `keepalive_timeout`) comes after it, and the loop is left alone; it costs one wake
/// a second.
///
/// Each tick also notes the time for [`about_now`], and ends the waits whose limits are kept
/// to the second ([`crate::deadline`]).
fn keep_a_timer() {
    let ticking = crate::deadline::ticking();
    tokio::spawn(async move {
        let _ticking = ticking;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            TICKED.set(Some(Instant::now()));
            crate::deadline::tick(tokio::time::Instant::now());
        }
    });
}

/// How often a busy proxy thread looks whether another proxy thread waits for its CPU:
/// [`take_turns`].
const TURN: Duration = Duration::from_millis(1);

/// Between requests: once a turn of [`TURN`] is over, notes the CPU this thread runs on, and
/// gives it up if another proxy thread last ran on that CPU and has not run since the turn
/// began. Left to the kernel, the two proxy threads of a 2-CPU machine often share one CPU
/// while the other runs the clients and Odoo, and a busy thread keeps its CPU until the
/// scheduler's tick takes it (4 ms at the usual 250 Hz): `perf sched timehist` under wrk
/// showed runs of 2-5 ms, each a wait of as long for every connection of the other thread,
/// the p99. A thread yields only to a sibling that waits for its CPU: yielding at every turn
/// would also hand the CPU to whatever else runs there (Odoo's workers, on a shared machine)
/// a thousand times a second.
fn take_turns() {
    let now = Instant::now();
    if !turn_over(TURNED.get(), now) {
        return;
    }
    TURNED.set(Some(now));
    let Some(me) = HERE.with(|here| here.get().cloned()) else {
        return;
    };
    let cpu = rustix::thread::sched_getcpu();
    let at = since_start(now);
    me.turn.store(turn_note(cpu, at), Ordering::Relaxed);
    let waits = THREADS.lock().is_ok_and(|all| {
        all.iter().any(|other| {
            !Arc::ptr_eq(other, &me) && waits_for(other.turn.load(Ordering::Relaxed), cpu, at)
        })
    });
    if waits {
        std::thread::yield_now();
        TURNED.set(Some(Instant::now()));
    }
}

/// Whether the turn that began `since` (none yet: `None`) is over at `now`.
fn turn_over(since: Option<Instant>, now: Instant) -> bool {
    since.is_none_or(|since| now.saturating_duration_since(since) >= TURN)
}

/// A thread's note of the end of a turn: on CPU `cpu`, `at` microseconds after erpgate
/// started ([`since_start`]). Never 0 (no note yet).
fn turn_note(cpu: usize, at: u64) -> u64 {
    ((at + 1) << 16) | (cpu as u64 & 0xffff)
}

/// Whether the thread whose last note is `other` waits for CPU `cpu` at `at`: it ended its
/// last turn on that CPU, and a whole turn has passed since without another (a thread that
/// runs notes one each turn; one that waits for the CPU cannot). A thread idle since its
/// last turn on that CPU looks the same; the yield to it then costs a system call.
fn waits_for(other: u64, cpu: usize, at: u64) -> bool {
    let Some(then) = (other >> 16).checked_sub(1) else {
        return false;
    };
    other & 0xffff == cpu as u64 & 0xffff && at.saturating_sub(then) >= TURN.as_micros() as u64
}

/// Microseconds from erpgate's first turn to `now`.
fn since_start(now: Instant) -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(|| now);
    u64::try_from(now.saturating_duration_since(start).as_micros()).unwrap_or(u64::MAX >> 17)
}

thread_local! {
    /// When this thread's turn began ([`take_turns`]): when it last looked for a waiting
    /// sibling, or when it had the CPU back after yielding to one.
    static TURNED: Cell<Option<Instant>> = const { Cell::new(None) };
}

thread_local! {
    /// When this thread's one-second timer ([`keep_a_timer`]) last fired.
    static TICKED: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The time to within a second, without reading the clock: when this thread's one-second
/// timer last fired (the clock, on a thread without one). For ages counted in tens of
/// seconds, such as an idle connection's to Odoo.
pub(crate) fn about_now() -> Instant {
    TICKED.get().unwrap_or_else(Instant::now)
}

/// Notes which thread accepts connections (Pingora calls it in the accept loop, for each
/// connection, before the connection goes to a thread), and lets every connection in.
#[derive(Debug)]
pub struct AcceptThread;

#[async_trait]
impl ConnectionFilter for AcceptThread {
    async fn should_accept(&self, _addr: Option<&std::net::SocketAddr>) -> bool {
        ACCEPTS.with(|a| a.set(true));
        true
    }
}

/// erpgate's own process as a pidfd (`None` where the kernel has none: before Linux 5.3).
fn own_pidfd() -> Option<BorrowedFd<'static>> {
    static PIDFD: OnceLock<Option<OwnedFd>> = OnceLock::new();
    PIDFD
        .get_or_init(|| pidfd_open(getpid(), PidfdFlags::empty()).ok())
        .as_ref()
        .map(|fd| fd.as_fd())
}

/// A plain client connection, registered with this thread's event loop. Pingora's accept
/// loops run on one thread and register each socket they accept with that thread's event
/// loop, then start the connection on a thread picked at random: for a connection on another
/// thread, every readiness of its socket went through the accepting thread, which woke this
/// one (an `eventfd` write; 0.76 per request under wrk with 64 connections on 2 threads).
/// Here the socket is taken over by a second descriptor (`pidfd_getfd` on erpgate's own
/// process: the one way to own a duplicate of a descriptor known only by its number without
/// `unsafe`), registered here; the first is let go. Where that fails (a kernel before 5.6,
/// a seccomp filter), the connection stays as it came, which works the same, only slower.
fn rehome(stream: Stream) -> Stream {
    match stream
        .as_any()
        .downcast_ref::<L4Stream>()
        .and_then(moved_here)
    {
        // The first descriptor goes with `stream`, off the accepting thread's event loop.
        Some(here) => Box::new(here),
        None => stream,
    }
}

/// The same for a TLS connection's socket, before its handshake (called by
/// [`crate::tls::VersionGate`], on the thread that runs the handshake and then serves it).
pub(crate) fn rehome_before_tls(socket: &mut L4Stream) {
    if let Some(here) = moved_here(socket) {
        *socket = here;
    }
}

/// `l4`'s socket registered with this thread's event loop, through a second descriptor;
/// `None` when it is registered here already or cannot be moved.
fn moved_here(l4: &L4Stream) -> Option<L4Stream> {
    if ACCEPTS.with(Cell::get) {
        return None;
    }
    let fd = match pidfd_getfd(own_pidfd()?, l4.as_raw_fd(), PidfdGetfdFlags::empty()) {
        Ok(fd) => fd,
        Err(e) => {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::info!(
                    "connections stay with the accepting thread's event loop: pidfd_getfd: {e}"
                );
            });
            return None;
        }
    };
    let socket = std::net::TcpStream::from(fd);
    // The descriptors share the socket's flags, non-blocking included; said again, as
    // registering requires it.
    socket.set_nonblocking(true).ok()?;
    let socket = tokio::net::TcpStream::from_std(socket).ok()?;
    let mut here = L4Stream::from(socket);
    let digest = SocketDigest::from_raw_fd(here.as_raw_fd());
    if let Some(peer) = l4.get_socket_digest().and_then(|d| d.peer_addr().cloned()) {
        let _ = digest.peer_addr.set(Some(peer));
    }
    here.set_socket_digest(digest);
    Some(here)
}

/// A client connection's task, on the thread it was given (`open` counts it there).
async fn connection_task(
    conns: Arc<Connections>,
    stream: Stream,
    shutdown: ShutdownWatch,
    open: OpenOn,
) {
    let _open = open;
    let stream = rehome(stream);
    conns.serve_http1(stream, shutdown).await;
}

/// Seconds for Pingora's own wait for the rest of a request head (whole seconds, at least 1).
fn whole_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[async_trait]
impl ServerApp for Connections {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if matches!(
            stream.selected_alpn_proto(),
            Some(ALPN::H2) | Some(ALPN::Custom(_))
        ) {
            return ServerApp::process_new(&self.proxy, stream, shutdown).await;
        }
        // The rest of the connection's life runs in a task of its own, so the accept task
        // (which holds room for a TLS handshake, about 7 KiB, even on plain listeners) ends
        // here. Pingora does not track connection tasks: on shutdown it waits out the grace
        // period and then stops the runtime, which this task runs on too.
        let conns = self.clone();
        let shutdown = shutdown.clone();
        let movable = stream.as_any().is::<L4Stream>();
        spawn_on_least_busy(movable, move |open| {
            connection_task(conns, stream, shutdown, open)
        });
        None
    }

    async fn cleanup(&self) {
        self.proxy.http_cleanup().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an idle keep-alive connection's task holds is this future: a request being served
    /// must not be kept in it (its state is boxed while it runs). Found at 1,264 bytes when
    /// the request's state was not boxed; 584 in a debug build as written.
    #[tokio::test]
    async fn the_connection_task_keeps_no_room_for_a_request() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/erpgate.toml");
        let cfg = crate::config::load(std::path::Path::new(path)).expect("default config");
        let store = Arc::new(ArcSwap::from_pointee(cfg));
        let gate = ErpGate::new(store.clone());
        let conf = Arc::new(pingora::server::configuration::ServerConf::default());
        let app = pingora::proxy::http_proxy(&conf, gate.clone());
        let conns = Arc::new(Connections::new(app, gate, store));
        let stream: Stream = Box::new(std::io::Cursor::new(Vec::new()));
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let task = conns.clone().serve_http1(stream, shutdown.clone());
        let size = std::mem::size_of_val(&task);
        assert!(size < 1024, "connection task future of {size} bytes");
        // The whole task holds that future once: a task wrapping it held it twice (before
        // and while awaiting it), 1 KiB more per idle connection.
        let open = OpenOn(this_thread());
        let stream: Stream = Box::new(std::io::Cursor::new(Vec::new()));
        let whole = connection_task(conns, stream, shutdown, open);
        let whole = std::mem::size_of_val(&whole);
        assert!(
            whole < size + 128,
            "connection task of {whole} bytes, its loop {size}"
        );
    }

    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// A socket accepted on one thread's event loop is moved to this thread's: the same
    /// connection, with its peer, working after the first event loop is gone.
    #[test]
    fn a_connection_moved_to_this_thread_is_the_same_connection_on_its_loop() {
        use std::io::{Read, Write};
        use tokio::io::AsyncWriteExt;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("non-blocking");
        let mut client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let accepting = current_thread();
        let (accepted, peer) = accepting.block_on(async {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let (socket, peer) = listener.accept().await.expect("accept");
            let mut l4 = L4Stream::from(socket);
            l4.set_socket_digest(SocketDigest::from_raw_fd(l4.as_raw_fd()));
            (Box::new(l4) as Stream, peer)
        });
        let before = accepted
            .as_any()
            .downcast_ref::<L4Stream>()
            .map(|s| s.as_raw_fd());
        // The accepting thread's event loop ends: a socket still registered with it can no
        // longer wait for anything.
        drop(accepting);
        current_thread().block_on(async {
            let mut moved = rehome(accepted);
            let after = moved
                .as_any()
                .downcast_ref::<L4Stream>()
                .map(|s| s.as_raw_fd());
            assert!(
                after.is_some() && after != before,
                "{before:?} -> {after:?}"
            );
            let seen = moved
                .get_socket_digest()
                .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied());
            assert_eq!(seen, Some(peer));
            client.write_all(b"ping").expect("write");
            let mut got = [0u8; 4];
            tokio::time::timeout(Duration::from_secs(5), moved.read_exact(&mut got))
                .await
                .expect("in time")
                .expect("read");
            assert_eq!(&got, b"ping");
            moved.write_all(b"pong").await.expect("write");
            moved.flush().await.expect("flush");
            let mut back = [0u8; 4];
            client.read_exact(&mut back).expect("read");
            assert_eq!(&back, b"pong");
        });
    }

    #[test]
    fn a_turn_is_over_after_a_millisecond() {
        let start = Instant::now();
        // A thread's first request ends a turn (it has had none yet).
        assert!(turn_over(None, start));
        assert!(!turn_over(Some(start), start));
        assert!(!turn_over(
            Some(start),
            start + TURN - Duration::from_micros(1)
        ));
        assert!(turn_over(Some(start), start + TURN));
        assert!(turn_over(Some(start), start + 5 * TURN));
        // A clock read before the turn began (another thread's) is not a turn over.
        assert!(!turn_over(Some(start + TURN), start));
    }

    #[test]
    fn a_thread_yields_only_to_a_sibling_waiting_for_its_cpu() {
        let turn = TURN.as_micros() as u64;
        // The other thread ended its last turn on this CPU a turn ago or more: it waits.
        assert!(waits_for(turn_note(1, 5_000), 1, 5_000 + turn));
        assert!(waits_for(turn_note(0, 0), 0, 4 * turn));
        // On this CPU, but it has run within the turn: it does not wait.
        assert!(!waits_for(turn_note(1, 5_000), 1, 5_000 + turn - 1));
        // On another CPU, however long ago: it does not wait for this one.
        assert!(!waits_for(turn_note(0, 5_000), 1, 50_000));
        // No note yet (a thread that has not served a turn).
        assert!(!waits_for(0, 0, 50_000));
        // A note from after `at` (another thread's clock read) is no wait.
        assert!(!waits_for(turn_note(1, 9_000), 1, 5_000));
    }

    #[test]
    fn a_connection_goes_to_the_least_busy_thread_and_stays_on_a_tie() {
        assert_eq!(less_busy([3, 5].into_iter(), 5), Some(0));
        assert_eq!(less_busy([5, 3, 2, 2].into_iter(), 5), Some(2));
        assert_eq!(less_busy([4, 4].into_iter(), 4), None);
        assert_eq!(less_busy([0].into_iter(), 0), None);
        assert_eq!(less_busy(std::iter::empty(), 0), None);
    }

    #[test]
    fn pingora_gets_whole_seconds_never_zero() {
        assert_eq!(whole_secs(Duration::from_secs(60)), 60);
        assert_eq!(whole_secs(Duration::from_millis(1500)), 2);
        assert_eq!(whole_secs(Duration::from_millis(10)), 1);
    }
}
