//! The live telemetry page, served with no internet.
//!
//! steady_state draws the actor graph in the browser with viz.js. Of its build modes only
//! `telemetry_server_cdn` builds offline, and in that mode its `index.html` and
//! `webworker.js` load viz.js from a CDN, which a closed network cannot reach: the page
//! stays blank. So steady_state's server listens on a private loopback port, and this
//! front listens on the configured address (`-o telemetry=ADDRESS:PORT`). It passes every
//! request through, rewrites the CDN address in pages and scripts to the local
//! `viz-lite.js`, and serves that script from the binary: viz.js 1.8.2, the version
//! steady_state's page is written for, vendored in `vendor/viz.js-1.8.2/` with its licence
//! and checksum.
//!
//! The front also drops steady_state's `Access-Control-Allow-Origin: *`, so web pages the
//! user visits cannot read the graph or the metrics through the browser.
//!
//! The server is a small one on `std::net`: one thread accepts, each connection gets a
//! thread of its own (a bounded number at once) and one request, answered with
//! `Connection: close`. (tiny_http was tried first: under load its thread pool can miss a
//! wake-up, and a request then waits until a long-lived keep-alive connection ends.)

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// viz.js 1.8.2's `viz-lite.js` (Graphviz compiled to JavaScript), as published in the npm
/// registry; `vendor/viz.js-1.8.2/README.md` has its origin, licence and checksum.
const VIZ_LITE_JS: &[u8] = include_bytes!("../vendor/viz.js-1.8.2/viz-lite.js");

/// The script's name, which the rewritten pages load from this server.
const VIZ_SCRIPT: &str = "viz-lite.js";

/// How many connections are served at once; more are closed at once. A browser opens six.
const MAX_CONNECTIONS: usize = 32;

/// How often the idle acceptor checks whether the front is stopping.
const ACCEPT_POLL: Duration = Duration::from_millis(50);

/// How long a browser may take to send its request or read the answer, per read or write.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest request head read (request line and headers).
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// How long a request to steady_state's server may take, per connect, read and write.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest answer taken from steady_state's server (its biggest, the graph of a large
/// pipeline or the metrics, is far smaller).
const MAX_UPSTREAM_BYTES: u64 = 32 * 1024 * 1024;

/// Why the telemetry page cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot serve the telemetry page on {address}: {source}; choose another address with -o telemetry=ADDRESS:PORT or turn it off with -o telemetry=off")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot reserve a loopback port for steady_state's telemetry server: {0}; check that the loopback interface is up")]
    Loopback(std::io::Error),
}

/// The running front. Dropping it stops it.
pub struct TelemetryFront {
    address: SocketAddr,
    upstream: SocketAddr,
    stopping: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl TelemetryFront {
    /// Listens on `address` and picks a free loopback port for steady_state's own server,
    /// which the caller hands to steady_state (see [`TelemetryFront::upstream`]).
    pub fn start(address: SocketAddr) -> Result<TelemetryFront, TelemetryError> {
        let bind_error = |source| TelemetryError::Bind { address, source };
        let listener = TcpListener::bind(address).map_err(bind_error)?;
        let bound = listener.local_addr().map_err(bind_error)?;
        // Non-blocking, so that the acceptor notices when the front stops.
        listener.set_nonblocking(true).map_err(bind_error)?;
        let upstream = free_loopback_port().map_err(TelemetryError::Loopback)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let stopping = stopping.clone();
            std::thread::Builder::new()
                .name("telemetry".into())
                .spawn(move || accept(&listener, &stopping, upstream))
                .map_err(bind_error)?
        };
        tracing::info!("telemetry page at http://{bound}/");
        Ok(TelemetryFront {
            address: bound,
            upstream,
            stopping,
            acceptor: Some(acceptor),
        })
    }

    /// Where the page is served (with the port the system chose if 0 was asked for).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Where steady_state's own server must listen: a loopback port only this front uses.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }
}

impl Drop for TelemetryFront {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// A loopback port nothing listens on now. steady_state binds it a moment later; in the
/// unlikely case that something else took it meanwhile, steady_state logs that it cannot
/// bind and the page answers 502.
fn free_loopback_port() -> std::io::Result<SocketAddr> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()
}

/// Accepts connections until the front stops; each is answered on a thread of its own.
/// Those threads end by themselves: every read and write on them has a timeout.
fn accept(listener: &TcpListener, stopping: &AtomicBool, upstream: SocketAddr) {
    let active = Arc::new(AtomicUsize::new(0));
    while !stopping.load(Ordering::Acquire) {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
            Err(err) => {
                tracing::debug!("telemetry page: accept failed: {err}");
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            continue;
        }
        let served = active.clone();
        let spawned = std::thread::Builder::new()
            .name("telemetry-client".into())
            .spawn(move || {
                if let Err(err) = answer(client, upstream) {
                    tracing::debug!("telemetry page: cannot answer a request: {err}");
                }
                served.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(err) = spawned {
            active.fetch_sub(1, Ordering::AcqRel);
            tracing::debug!("telemetry page: cannot start a thread for a request: {err}");
        }
    }
}

/// Reads one request from `client` and answers it.
fn answer(mut client: TcpStream, upstream: SocketAddr) -> std::io::Result<()> {
    client.set_nonblocking(false)?;
    client.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    client.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let head = read_request_head(&mut client)?;
    let mut words = head.split_whitespace();
    let (method, url) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return respond(&mut client, 405, None, false, b"", head_only);
    }
    if !url.starts_with('/') || url.chars().any(|c| !c.is_ascii_graphic()) {
        return respond(&mut client, 400, None, false, b"", head_only);
    }
    if path_of(url) == format!("/{VIZ_SCRIPT}") {
        return respond(
            &mut client,
            200,
            Some("text/javascript"),
            false,
            VIZ_LITE_JS,
            head_only,
        );
    }
    match fetch(upstream, url).and_then(localized) {
        Ok(reply) => respond(
            &mut client,
            reply.status,
            reply.content_type.as_deref(),
            reply.gzipped,
            &reply.body,
            head_only,
        ),
        Err(err) => {
            let text = format!("steady_state's telemetry server did not answer: {err}\n");
            respond(
                &mut client,
                502,
                Some("text/plain"),
                false,
                text.as_bytes(),
                head_only,
            )
        }
    }
}

/// The request line and headers, up to the blank line that ends them.
fn read_request_head(client: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut chunk = [0u8; 2048];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        if head.len() > MAX_REQUEST_HEAD {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request head too long",
            ));
        }
        let read = client.read(&mut chunk)?;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(chunk.get(..read).unwrap_or_default());
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

fn respond(
    client: &mut TcpStream,
    status: u16,
    content_type: Option<&str>,
    gzipped: bool,
    body: &[u8],
    head_only: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        502 => "Bad Gateway",
        _ => "Status",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n",
        body.len()
    );
    // Only a plain header value is passed on from upstream.
    if let Some(kind) =
        content_type.filter(|kind| kind.chars().all(|c| c == ' ' || c.is_ascii_graphic()))
    {
        head.push_str(&format!("Content-Type: {kind}\r\n"));
    }
    if gzipped {
        head.push_str("Content-Encoding: gzip\r\n");
    }
    if status == 405 {
        head.push_str("Allow: GET, HEAD\r\n");
    }
    head.push_str("\r\n");
    client.write_all(head.as_bytes())?;
    if !head_only {
        client.write_all(body)?;
    }
    client.flush()
}

/// The path of a request URL, without its query.
fn path_of(url: &str) -> &str {
    url.split_once('?').map_or(url, |(path, _)| path)
}

/// One answer of steady_state's server.
#[derive(Debug, PartialEq, Eq)]
struct Reply {
    status: u16,
    content_type: Option<String>,
    gzipped: bool,
    body: Vec<u8>,
}

/// GET `url` from steady_state's server. It answers each connection once, with a
/// `Content-Length`, and closes it.
fn fetch(upstream: SocketAddr, url: &str) -> std::io::Result<Reply> {
    let mut stream = TcpStream::connect_timeout(&upstream, UPSTREAM_TIMEOUT)?;
    stream.set_read_timeout(Some(UPSTREAM_TIMEOUT))?;
    stream.set_write_timeout(Some(UPSTREAM_TIMEOUT))?;
    // One write: steady_state parses the request from its first read alone.
    let request = format!("GET {url} HTTP/1.1\r\nHost: {upstream}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream.take(MAX_UPSTREAM_BYTES).read_to_end(&mut raw)?;
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> std::io::Result<Reply> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let head_end = raw
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or_else(|| bad("an answer without the end of its headers"))?;
    let (head, body) = raw.split_at(head_end);
    let body = body.get(4..).unwrap_or_default();
    let head = std::str::from_utf8(head).map_err(|_| bad("headers that are not text"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| bad("an answer without a status"))?;
    let mut reply = Reply {
        status,
        content_type: None,
        gzipped: false,
        body: body.to_vec(),
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-type") {
            reply.content_type = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("content-encoding") {
            reply.gzipped = value.eq_ignore_ascii_case("gzip");
        } else if name.eq_ignore_ascii_case("content-length") {
            let length = value
                .parse::<usize>()
                .map_err(|_| bad("a bad Content-Length"))?;
            if length > reply.body.len() {
                return Err(bad("an answer shorter than its Content-Length"));
            }
            reply.body.truncate(length);
        }
    }
    Ok(reply)
}

/// Pages and scripts load viz.js from this server instead of the CDN.
fn localized(mut reply: Reply) -> std::io::Result<Reply> {
    let is_text = reply
        .content_type
        .as_deref()
        .is_some_and(|kind| kind.starts_with("text/html") || kind.contains("javascript"));
    if !is_text {
        return Ok(reply);
    }
    if reply.gzipped {
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(reply.body.as_slice())
            .take(MAX_UPSTREAM_BYTES)
            .read_to_end(&mut plain)?;
        reply.body = plain;
        reply.gzipped = false;
    }
    if let Ok(text) = std::str::from_utf8(&reply.body) {
        reply.body = local_viz(text).into_bytes();
    }
    Ok(reply)
}

/// `text` with every absolute URL of `viz-lite.js` (such as
/// `https://unpkg.com/viz.js@1.8.2/viz-lite.js`) replaced by the relative `viz-lite.js`.
fn local_viz(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(found) = rest.find(VIZ_SCRIPT) {
        let (before, after) = rest.split_at(found);
        let url_start = before
            .rfind(|c: char| matches!(c, '"' | '\'' | '(' | '=' | '<' | '>') || c.is_whitespace())
            .map_or(0, |at| at + 1);
        let url = &before[url_start..];
        if url.starts_with("http://") || url.starts_with("https://") {
            out.push_str(&before[..url_start]);
        } else {
            out.push_str(before);
        }
        out.push_str(VIZ_SCRIPT);
        rest = &after[VIZ_SCRIPT.len()..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdn_addresses_become_the_local_script() {
        let page = r#"<script src="https://unpkg.com/viz.js@1.8.2/viz-lite.js"></script>"#;
        assert_eq!(local_viz(page), r#"<script src="viz-lite.js"></script>"#);
        let worker = "this.importScripts('https://cdn.example/viz.js@2/viz-lite.js');";
        assert_eq!(local_viz(worker), "this.importScripts('viz-lite.js');");
        let already_local = "importScripts('viz-lite.js'); // viz-lite.js";
        assert_eq!(local_viz(already_local), already_local);
        assert_eq!(local_viz("no script here"), "no script here");
    }

    #[test]
    fn replies_are_parsed_and_cut_to_their_length() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\nContent-Type: text/html\r\nContent-Length: 3\r\n\r\nabcdef";
        assert_eq!(
            parse_reply(raw).ok(),
            Some(Reply {
                status: 200,
                content_type: Some("text/html".into()),
                gzipped: true,
                body: b"abc".to_vec(),
            })
        );
        assert!(parse_reply(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc").is_err());
        assert!(parse_reply(b"garbage").is_err());
    }

    #[test]
    fn gzipped_pages_are_unpacked_and_localized() {
        let mut packed = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let page = "<script src=\"https://unpkg.com/viz.js@1.8.2/viz-lite.js\"></script>";
        packed.write_all(page.as_bytes()).ok();
        let reply = Reply {
            status: 200,
            content_type: Some("text/html".into()),
            gzipped: true,
            body: packed.finish().unwrap_or_default(),
        };
        let local = localized(reply).ok();
        assert_eq!(
            local.map(|reply| (reply.gzipped, reply.body)),
            Some((false, b"<script src=\"viz-lite.js\"></script>".to_vec()))
        );
    }

    /// A GET through `front`, the whole answer as text (bodies here are small and ASCII,
    /// except the script, whose length is what matters).
    fn get(front: SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(front).unwrap_or_else(|err| panic!("{err}"));
        stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
        stream.write_all(request.as_bytes()).ok();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).ok();
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[test]
    fn the_front_serves_the_page_with_the_local_script() {
        let front = TelemetryFront::start((Ipv4Addr::LOCALHOST, 0).into())
            .unwrap_or_else(|err| panic!("{err}"));
        // Stands in for steady_state: one gzipped page pointing at the CDN.
        let upstream = TcpListener::bind(front.upstream()).unwrap_or_else(|err| panic!("{err}"));
        let fake = std::thread::spawn(move || {
            let (mut stream, _) = upstream.accept().unwrap_or_else(|err| panic!("{err}"));
            let mut request = [0u8; 1024];
            let read = stream.read(&mut request).unwrap_or(0);
            let mut packed = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            packed
                .write_all(b"<script src=\"https://unpkg.com/viz.js@1.8.2/viz-lite.js\"></script>")
                .ok();
            let body = packed.finish().unwrap_or_default();
            let head = format!(
                "HTTP/1.1 200 OK\r\nAccess-Control-Allow-Origin: *\r\ncontent-encoding: gzip\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            stream.write_all(head.as_bytes()).ok();
            stream.write_all(&body).ok();
            String::from_utf8_lossy(&request[..read]).into_owned()
        });
        let page = get(front.address(), "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
        assert!(
            page.ends_with("<script src=\"viz-lite.js\"></script>"),
            "{page}"
        );
        assert!(!page.contains("Access-Control"), "{page}");
        let asked = fake.join().unwrap_or_default();
        assert!(asked.starts_with("GET / HTTP/1.1\r\n"), "{asked}");

        let script = get(front.address(), "GET /viz-lite.js HTTP/1.1\r\n\r\n");
        assert!(script.contains(&format!("Content-Length: {}", VIZ_LITE_JS.len())));
        assert!(script.len() > VIZ_LITE_JS.len());
        let refused = get(front.address(), "POST / HTTP/1.1\r\n\r\n");
        assert!(refused.starts_with("HTTP/1.1 405"), "{refused}");
        // steady_state is not there any more: the page says so instead of hanging.
        let missing = get(front.address(), "GET /graph.dot HTTP/1.1\r\n\r\n");
        assert!(missing.starts_with("HTTP/1.1 502"), "{missing}");
    }

    #[test]
    fn the_vendored_script_is_viz_js() {
        assert!(VIZ_LITE_JS.len() > 1_000_000);
        let head = String::from_utf8_lossy(&VIZ_LITE_JS[..4096]);
        assert!(head.contains("Viz"), "{head}");
    }
}
