//! Links: one peer each, run by plain threads and talked to through channels.
//!
//! Per live connection there are two threads. The link's own thread sets the connection
//! up and then reads from it, turning messages into [`LinkEvent`]s; a writer thread takes
//! messages from a bounded queue (so a fast sender waits for a slow peer) and sends a
//! keepalive whenever the queue stays empty for a keepalive period. Whichever half fails
//! first names the reason; the other is stopped, and the link reports `Disconnected`.
//!
//! Events go through a bounded queue too: while the owner leaves it full, the link stops
//! reading, TCP pushes back on the peer, and a peer that can send nothing for three
//! keepalive periods drops the connection. Owners must keep reading events.
//!
//! A dialed link then waits (exponential backoff with jitter) and connects again; a link
//! accepted by a [`Listener`] ends. Messages queued when a connection ends are dropped:
//! the sync protocol acknowledges what it needs and resends after reconnecting.
//!
//! Closing a link first lets the writer send what is queued (for at most
//! [`CLOSE_FLUSH`]) and end its direction, so the peer sees a clean end after the last
//! message; then the socket is cut. Every wait is bounded, so closing is too.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, select, Receiver, RecvTimeoutError, SendTimeoutError, Sender};
use parking_lot::Mutex;

use super::backoff::{Backoff, MAX_DELAY, MIN_DELAY};
use super::channel::{self, ChannelReceiver, ChannelSender, Established, Expect};
use super::frame::Deadline;
use super::{LinkConfig, LinkEvent, NetError, PathKind};
use crate::identity::NodeId;
use crate::sync::proto::Message;

/// Messages waiting to be sent on one connection.
const OUTGOING_QUEUE: usize = 256;
/// Events waiting for the link's owner; when full, the link stops reading from the peer.
const EVENT_QUEUE: usize = 256;
/// Accepted links waiting for the listener's owner.
const ACCEPTED_QUEUE: usize = 64;
const REJECTION_QUEUE: usize = 64;
/// Connections in their handshake at once; more are refused until some finish.
const MAX_PENDING_HANDSHAKES: usize = 32;
/// How long closing waits for queued messages to go out.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);
/// The listener's accept thread looks at its stop signal at least this often.
const ACCEPT_POLL_MS: i32 = 1000;
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
const LISTEN_BACKLOG: i32 = 128;

/// State of a link shared by its handle and its threads.
struct Shared {
    peer: NodeId,
    path: PathKind,
    connected: AtomicBool,
    closing: AtomicBool,
    /// The current connection's queue; `None` while disconnected.
    outgoing: Mutex<Option<Sender<Message>>>,
    /// The current socket, to cut it when the link closes.
    socket: Mutex<Option<TcpStream>>,
    /// What connections that have ended carried.
    finished: Mutex<Traffic>,
}

impl Shared {
    fn cut(&self) {
        if let Some(socket) = self.socket.lock().as_ref() {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// One peer: its connection, its events and its outgoing queue.
pub struct Link {
    shared: Arc<Shared>,
    events: Receiver<LinkEvent>,
    /// Never sent on: dropping it tells every thread of the link to stop.
    stop: Option<Sender<()>>,
    /// Disconnected when the link's thread has ended.
    done: Receiver<()>,
    thread: Option<JoinHandle<()>>,
    /// The longest the link's thread can take to notice a stop.
    close_bound: Duration,
}

/// What the threads of one link get.
struct Context {
    shared: Arc<Shared>,
    cfg: LinkConfig,
    events: Sender<LinkEvent>,
    stop: Receiver<()>,
    /// Held until the thread ends.
    _done: Sender<()>,
}

impl Link {
    /// A link that connects to `peer` at `addr` and reconnects whenever the connection is
    /// lost or cannot be made. Only a node proving the key of `peer` is accepted.
    pub fn dial(peer: NodeId, addr: SocketAddr, cfg: LinkConfig) -> Link {
        Link::dial_from(peer, addr, None, cfg)
    }

    /// Like [`Link::dial`], but every connection leaves from `local` (shared with a
    /// listener on the same port), so the peer sees the address a NAT gives that port.
    pub fn dial_from(
        peer: NodeId,
        addr: SocketAddr,
        local: Option<SocketAddr>,
        cfg: LinkConfig,
    ) -> Link {
        let name = format!("link-{}", peer.short());
        Link::start(peer, PathKind::Direct, cfg, name, move |ctx| {
            dial_loop(&ctx, addr, local)
        })
    }

    /// The link of a connection that is already set up (accepted by a [`Listener`],
    /// punched through NATs or relayed); it ends with the connection.
    pub(crate) fn over(established: Established, cfg: LinkConfig, path: PathKind) -> Link {
        let peer = established.peer;
        let name = format!("peer-{}", peer.short());
        Link::start(peer, path, cfg, name, move |ctx| {
            let (reason, clean) = run_connection(&ctx, established);
            // Closing consumed the handle; no one listens for this event any more.
            if !ctx.shared.closing.load(Ordering::SeqCst) {
                deliver(&ctx, LinkEvent::Disconnected { reason, clean });
            }
        })
    }

    fn start(
        peer: NodeId,
        path: PathKind,
        cfg: LinkConfig,
        name: String,
        body: impl FnOnce(Context) + Send + 'static,
    ) -> Link {
        let shared = Arc::new(Shared {
            peer,
            path,
            connected: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            outgoing: Mutex::new(None),
            socket: Mutex::new(None),
            finished: Mutex::new(Traffic::default()),
        });
        let (events_tx, events) = bounded(EVENT_QUEUE);
        let (stop, stop_rx) = bounded(0);
        let (done_tx, done) = bounded(0);
        let close_bound = cfg.handshake_timeout.saturating_add(CLOSE_FLUSH * 2);
        let failure_events = events_tx.clone();
        let ctx = Context {
            shared: Arc::clone(&shared),
            cfg,
            events: events_tx,
            stop: stop_rx,
            _done: done_tx,
        };
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || body(ctx))
            .map_err(|e| {
                tracing::error!("cannot start the thread of the link to {peer}: {e}");
                let _ = failure_events.try_send(LinkEvent::Disconnected {
                    reason: format!("cannot start a thread: {e}"),
                    clean: false,
                });
            })
            .ok();
        Link {
            shared,
            events,
            stop: Some(stop),
            done,
            thread,
            close_bound,
        }
    }

    /// Connected, Received and Disconnected events, in order.
    pub fn events(&self) -> &Receiver<LinkEvent> {
        &self.events
    }

    /// Queues `msg` for the peer, waiting while the queue is full.
    pub fn send(&self, msg: Message) -> Result<(), NetError> {
        let queue = self.queue()?;
        queue.send(msg).map_err(|_| self.not_connected())
    }

    /// Like [`Link::send`], but gives up when the queue stays full for `timeout`.
    pub fn send_timeout(&self, msg: Message, timeout: Duration) -> Result<(), NetError> {
        let queue = self.queue()?;
        queue.send_timeout(msg, timeout).map_err(|e| match e {
            SendTimeoutError::Timeout(_) => NetError::QueueFull {
                peer: self.shared.peer,
            },
            SendTimeoutError::Disconnected(_) => self.not_connected(),
        })
    }

    fn queue(&self) -> Result<Sender<Message>, NetError> {
        self.shared
            .outgoing
            .lock()
            .clone()
            .ok_or_else(|| self.not_connected())
    }

    fn not_connected(&self) -> NetError {
        NetError::NotConnected {
            peer: self.shared.peer,
        }
    }

    /// Cuts the current connection (a peer that misbehaved or stalled). A dialed link
    /// reconnects after its backoff; an accepted one ends.
    pub fn disconnect(&self) {
        self.shared.cut();
    }

    /// Whether the link's thread has ended (an accepted link whose connection is gone).
    pub fn is_finished(&self) -> bool {
        self.done.try_recv() == Err(crossbeam_channel::TryRecvError::Disconnected)
    }

    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::SeqCst)
    }

    pub fn peer(&self) -> NodeId {
        self.shared.peer
    }

    /// How the link reaches its peer.
    pub fn path(&self) -> PathKind {
        self.shared.path
    }

    /// Disconnected once the link's thread has ended, for a watcher that does not own
    /// the link.
    pub fn ended(&self) -> Receiver<()> {
        self.done.clone()
    }

    /// What the link has carried over all its connections, with the current connection's
    /// round-trip time and queue. Read from the kernel, so it costs nothing until asked.
    pub fn traffic(&self) -> Traffic {
        let finished = self.shared.finished.lock();
        let mut traffic = *finished;
        if self.is_connected() {
            if let Some(live) = self.shared.socket.lock().as_ref().and_then(tcp_traffic) {
                traffic.bytes_in += live.bytes_in;
                traffic.bytes_out += live.bytes_out;
                traffic.rtt = live.rtt;
            }
            traffic.queued = self.shared.outgoing.lock().as_ref().map_or(0, Sender::len);
        }
        traffic
    }

    /// Sends what is queued (for at most a second), closes the connection and stops the
    /// link's threads. Returns within the handshake timeout plus a few seconds.
    pub fn close(mut self) {
        self.signal_stop();
        if self.done.recv_timeout(CLOSE_FLUSH) == Err(RecvTimeoutError::Timeout) {
            // The peer did not answer the end of our stream in time: cut the connection.
            self.shared.cut();
            if self.done.recv_timeout(self.close_bound) == Err(RecvTimeoutError::Timeout) {
                tracing::warn!(
                    "the link to {} did not stop within {:?}; leaving its thread behind",
                    self.shared.peer,
                    self.close_bound
                );
                return;
            }
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    fn signal_stop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.stop.take();
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if self.stop.is_some() {
            self.signal_stop();
            self.shared.cut();
        }
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("peer", &self.shared.peer)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

/// Hands an event to the link's owner, unless the link stops first.
fn deliver(ctx: &Context, event: LinkEvent) -> bool {
    select! {
        send(ctx.events, event) -> sent => sent.is_ok(),
        recv(ctx.stop) -> _ => false,
    }
}

fn dial_loop(ctx: &Context, addr: SocketAddr, local: Option<SocketAddr>) {
    let peer = ctx.shared.peer;
    let mut backoff = Backoff::new(MIN_DELAY, MAX_DELAY);
    while !ctx.shared.closing.load(Ordering::SeqCst) {
        match connect(ctx, addr, local) {
            Ok(established) => {
                backoff.reset();
                let (reason, clean) = run_connection(ctx, established);
                if ctx.shared.closing.load(Ordering::SeqCst) {
                    break;
                }
                deliver(ctx, LinkEvent::Disconnected { reason, clean });
            }
            Err(error) => {
                if ctx.shared.closing.load(Ordering::SeqCst) {
                    break;
                }
                tracing::warn!("cannot connect to {peer} at {addr}: {error}");
                // Informational: a full queue must not stop the reconnecting.
                let _ = ctx.events.try_send(LinkEvent::Disconnected {
                    reason: error.to_string(),
                    clean: false,
                });
            }
        }
        let delay = backoff.next_delay();
        tracing::debug!("next connection attempt to {peer} in {delay:?}");
        if ctx.stop.recv_timeout(delay) != Err(RecvTimeoutError::Timeout) {
            break;
        }
    }
}

fn connect(
    ctx: &Context,
    addr: SocketAddr,
    local: Option<SocketAddr>,
) -> Result<Established, NetError> {
    let deadline = Deadline::after(ctx.cfg.handshake_timeout, "during connection setup");
    let stream = super::connect_from(local, addr, ctx.cfg.handshake_timeout)
        .map_err(|source| NetError::Connect { addr, source })?;
    *ctx.shared.socket.lock() = Some(stream.try_clone().map_err(NetError::Io)?);
    if ctx.shared.closing.load(Ordering::SeqCst) {
        return Err(NetError::ClosedHere);
    }
    channel::establish(
        stream,
        true,
        &ctx.cfg,
        Expect::Peer(ctx.shared.peer),
        deadline,
    )
}

/// Runs one established connection until it ends; returns the reason and whether the
/// end was clean.
fn run_connection(ctx: &Context, established: Established) -> (String, bool) {
    let Established {
        mut sender,
        receiver,
        socket,
        peer,
        addr,
        hello,
    } = established;
    let idle_limit = ctx.cfg.idle_limit();
    let first_error: Arc<Mutex<Option<NetError>>> = Arc::new(Mutex::new(None));
    let (queue, outgoing) = bounded(OUTGOING_QUEUE);
    // Dropped when the connection ends, which stops the writer.
    let (ended, ended_rx) = bounded::<()>(0);
    let writer_socket = socket.try_clone();
    *ctx.shared.socket.lock() = socket.try_clone().ok();
    let writer = match (writer_socket, sender.set_write_timeout(idle_limit)) {
        (Ok(writer_socket), Ok(())) => {
            let writer = Writer {
                sender,
                outgoing,
                ended: ended_rx,
                stop: ctx.stop.clone(),
                socket: writer_socket,
                keepalive: ctx.cfg.keepalive_period(),
                first_error: Arc::clone(&first_error),
            };
            std::thread::Builder::new()
                .name(format!("send-{}", peer.short()))
                .spawn(move || writer.run())
                .map_err(NetError::Io)
        }
        (Err(e), _) => Err(NetError::Io(e)),
        (_, Err(e)) => Err(e),
    };
    let writer = match writer {
        Ok(writer) => writer,
        Err(error) => {
            let _ = socket.shutdown(std::net::Shutdown::Both);
            return (error.to_string(), false);
        }
    };
    *ctx.shared.outgoing.lock() = Some(queue);
    ctx.shared.connected.store(true, Ordering::SeqCst);
    tracing::info!(
        "connected to {peer} ({}) at {addr}",
        hello.node_name.escape_debug()
    );
    deliver(ctx, LinkEvent::Connected { peer, addr, hello });

    let read_error = read_loop(ctx, receiver, idle_limit);
    first_error.lock().get_or_insert(read_error);

    {
        // Under the lock, so a concurrent `traffic()` counts this connection once.
        let mut finished = ctx.shared.finished.lock();
        if let Some(last) = tcp_traffic(&socket) {
            finished.bytes_in += last.bytes_in;
            finished.bytes_out += last.bytes_out;
        }
        ctx.shared.connected.store(false, Ordering::SeqCst);
    }
    ctx.shared.outgoing.lock().take();
    drop(ended);
    let _ = socket.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();
    let error = first_error.lock().take().unwrap_or(NetError::PeerClosed);
    let error = if ctx.shared.closing.load(Ordering::SeqCst) {
        NetError::ClosedHere
    } else {
        error
    };
    let clean = error.is_clean_close();
    if clean {
        tracing::info!("connection to {peer} at {addr} ended: {error}");
    } else {
        tracing::warn!("connection to {peer} at {addr} dropped: {error}");
    }
    (error.to_string(), clean)
}

/// What a link carried, as the kernel counts it for TCP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Bytes received (TCP payload: the encrypted frames).
    pub bytes_in: u64,
    /// Bytes sent and acknowledged by the peer's kernel.
    pub bytes_out: u64,
    /// The smoothed round-trip time of the current connection.
    pub rtt: Option<Duration>,
    /// Messages waiting in the current connection's queue.
    pub queued: usize,
}

/// The kernel's counters of one TCP connection (`TCP_INFO`); `None` if it will not say.
fn tcp_traffic(socket: &TcpStream) -> Option<Traffic> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>()).ok()?;
    // SAFETY: the descriptor is a live socket; `info` is writable for `len` bytes and the
    // kernel writes at most that many, reporting how many in `len`.
    let result = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if result != 0 {
        return None;
    }
    // SAFETY: tcp_info is plain integers, so the zeroed bytes the kernel did not fill (an
    // older kernel fills fewer fields) are valid values too.
    let info = unsafe { info.assume_init() };
    Some(Traffic {
        bytes_in: info.tcpi_bytes_received,
        bytes_out: info.tcpi_bytes_acked,
        rtt: (info.tcpi_rtt > 0).then(|| Duration::from_micros(u64::from(info.tcpi_rtt))),
        queued: 0,
    })
}

/// Reads until the connection fails or ends; returns why.
fn read_loop(ctx: &Context, mut receiver: ChannelReceiver, idle_limit: Duration) -> NetError {
    loop {
        match receiver.recv(idle_limit) {
            Ok(Message::Keepalive) => {}
            Ok(message) => {
                // While closing, messages are read (so the peer can finish) but dropped.
                if !ctx.shared.closing.load(Ordering::SeqCst) {
                    deliver(ctx, LinkEvent::Received(message));
                }
            }
            Err(error) => return error,
        }
    }
}

/// The sending side of one connection.
struct Writer {
    sender: ChannelSender,
    outgoing: Receiver<Message>,
    ended: Receiver<()>,
    stop: Receiver<()>,
    socket: TcpStream,
    keepalive: Duration,
    first_error: Arc<Mutex<Option<NetError>>>,
}

impl Writer {
    fn run(mut self) {
        loop {
            let sent = select! {
                recv(self.outgoing) -> message => match message {
                    Ok(message) => self.sender.send(&message),
                    Err(_) => return,
                },
                recv(self.ended) -> _ => return,
                recv(self.stop) -> _ => {
                    self.finish();
                    return;
                },
                default(self.keepalive) => self.sender.send(&Message::Keepalive),
            };
            if let Err(error) = sent {
                if let NetError::Encode(_) = error {
                    // Nothing was written: the connection is intact, only this message is lost.
                    tracing::error!("a message was not sent: {error}");
                    continue;
                }
                self.first_error.lock().get_or_insert(error);
                let _ = self.socket.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
    }

    /// Sends what is queued, within [`CLOSE_FLUSH`], then ends this direction.
    fn finish(&mut self) {
        let flushed = self.sender.set_write_timeout(CLOSE_FLUSH).and_then(|()| {
            let deadline = Deadline::after(CLOSE_FLUSH, "while closing");
            while let Ok(message) = self.outgoing.try_recv() {
                if deadline.expired() {
                    break;
                }
                self.sender.send(&message)?;
            }
            Ok(())
        });
        if let Err(error) = flushed {
            tracing::debug!("messages queued at close were not all sent: {error}");
        }
        let _ = self.socket.shutdown(std::net::Shutdown::Write);
    }
}

/// An incoming connection that was not accepted, and why.
#[derive(Debug)]
pub struct Rejection {
    pub addr: SocketAddr,
    pub error: NetError,
}

/// Accepts connections from configured peers; each becomes a [`Link`].
pub struct Listener {
    local_addr: SocketAddr,
    links: Receiver<Link>,
    rejections: Receiver<Rejection>,
    /// The write end of a pipe the accept thread polls: closing it wakes the thread.
    wake: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    pub fn bind(addr: SocketAddr, cfg: LinkConfig) -> Result<Listener, NetError> {
        let bind_error = |source| NetError::Bind { addr, source };
        let listener = super::shared_port_socket(addr)
            .and_then(|socket| {
                socket.listen(LISTEN_BACKLOG)?;
                Ok(TcpListener::from(socket))
            })
            .map_err(bind_error)?;
        listener.set_nonblocking(true).map_err(bind_error)?;
        let local_addr = listener.local_addr().map_err(bind_error)?;
        let (wake_rx, wake) =
            rustix::pipe::pipe().map_err(|e| bind_error(std::io::Error::from(e)))?;
        if cfg.allowed.is_empty() {
            tracing::warn!(
                "listening on {local_addr} with no peers configured: every connection will be refused; add peers with -o peer=ID"
            );
        } else {
            tracing::info!(
                "listening for {} peer(s) on {local_addr}",
                cfg.allowed.len()
            );
        }
        let (links_tx, links) = bounded(ACCEPTED_QUEUE);
        let (rejections_tx, rejections) = bounded(REJECTION_QUEUE);
        let acceptor = Acceptor {
            listener,
            wake: wake_rx,
            cfg,
            links: links_tx,
            rejections: rejections_tx,
            pending: Arc::new(AtomicUsize::new(0)),
        };
        let thread = std::thread::Builder::new()
            .name(format!("listen-{}", local_addr.port()))
            .spawn(move || acceptor.run())
            .map_err(bind_error)?;
        Ok(Listener {
            local_addr,
            links,
            rejections,
            wake: Some(wake),
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A link for each connection that passed the handshake.
    pub fn links(&self) -> &Receiver<Link> {
        &self.links
    }

    /// Connections that were refused, with the reason (also logged). When nobody takes
    /// them, the oldest stay and newer ones are only logged.
    pub fn rejections(&self) -> &Receiver<Rejection> {
        &self.rejections
    }

    /// Stops accepting. Links already handed out keep running.
    pub fn close(mut self) {
        self.wake.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.wake.take();
    }
}

struct Acceptor {
    listener: TcpListener,
    wake: OwnedFd,
    cfg: LinkConfig,
    links: Sender<Link>,
    rejections: Sender<Rejection>,
    pending: Arc<AtomicUsize>,
}

impl Acceptor {
    fn run(self) {
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.listener.as_fd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is an array of two initialised pollfd that outlives the call,
            // and its length is passed with it.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, ACCEPT_POLL_MS) };
            if fds[1].revents != 0 {
                return;
            }
            if ready < 0 {
                let error = std::io::Error::last_os_error();
                if error.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!("the listener stops: poll failed: {error}");
                    return;
                }
            }
            self.accept_ready();
        }
    }

    fn accept_ready(&self) {
        loop {
            match self.listener.accept() {
                Ok((stream, addr)) => self.admit(stream, addr),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Such as too many open files. The connection stays pending, so poll
                    // would report it again at once: pause instead of spinning.
                    tracing::warn!("cannot accept a connection: {e}");
                    std::thread::sleep(ACCEPT_ERROR_PAUSE);
                    return;
                }
            }
        }
    }

    fn admit(&self, stream: TcpStream, addr: SocketAddr) {
        if self.pending.load(Ordering::SeqCst) >= MAX_PENDING_HANDSHAKES {
            self.reject(addr, NetError::Busy { addr });
            return;
        }
        if let Err(e) = stream.set_nonblocking(false) {
            self.reject(addr, NetError::Io(e));
            return;
        }
        self.pending.fetch_add(1, Ordering::SeqCst);
        let cfg = self.cfg.clone();
        let links = self.links.clone();
        let rejections = self.rejections.clone();
        let pending = Arc::clone(&self.pending);
        let spawned = std::thread::Builder::new()
            .name(format!("accept-{addr}"))
            .spawn(move || {
                let deadline = Deadline::after(cfg.handshake_timeout, "during connection setup");
                let result =
                    channel::establish(stream, false, &cfg, Expect::AnyOf(&cfg.allowed), deadline);
                pending.fetch_sub(1, Ordering::SeqCst);
                match result {
                    Ok(established) => {
                        let timeout = cfg.handshake_timeout;
                        let link = Link::over(established, cfg, PathKind::Direct);
                        if let Err(e) = links.send_timeout(link, timeout) {
                            tracing::warn!(
                                "dropping the connection from {addr}: no one took it in time"
                            );
                            e.into_inner().close();
                        }
                    }
                    Err(error) => {
                        tracing::warn!("refused the connection from {addr}: {error}");
                        let _ = rejections.try_send(Rejection { addr, error });
                    }
                }
            });
        if let Err(e) = spawned {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            self.reject(addr, NetError::Io(e));
        }
    }

    fn reject(&self, addr: SocketAddr, error: NetError) {
        tracing::warn!("refused the connection from {addr}: {error}");
        let _ = self.rejections.try_send(Rejection { addr, error });
    }
}
