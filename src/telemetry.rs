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

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tiny_http::{Header, Method, Request, Response, Server, StatusCode};

/// viz.js 1.8.2's `viz-lite.js` (Graphviz compiled to JavaScript), as published in the npm
/// registry; `vendor/viz.js-1.8.2/README.md` has its origin, licence and checksum.
const VIZ_LITE_JS: &[u8] = include_bytes!("../vendor/viz.js-1.8.2/viz-lite.js");

/// The script's name, which the rewritten pages load from this server.
const VIZ_SCRIPT: &str = "viz-lite.js";

/// How many threads answer the browser: the page loads a few files at once, then polls
/// `/graph.dot`.
const WORKERS: usize = 4;

/// How often an idle worker checks whether the front is stopping.
const STOP_POLL: Duration = Duration::from_millis(200);

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
    server: Arc<Server>,
    stopping: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl TelemetryFront {
    /// Listens on `address` and picks a free loopback port for steady_state's own server,
    /// which the caller hands to steady_state (see [`TelemetryFront::upstream`]).
    pub fn start(address: SocketAddr) -> Result<TelemetryFront, TelemetryError> {
        let listener = TcpListener::bind(address)
            .map_err(|source| TelemetryError::Bind { address, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| TelemetryError::Bind { address, source })?;
        let upstream = free_loopback_port().map_err(TelemetryError::Loopback)?;
        let server = Server::from_listener(listener, None).map_err(|err| TelemetryError::Bind {
            address,
            source: std::io::Error::other(err.to_string()),
        })?;
        let server = Arc::new(server);
        let stopping = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::with_capacity(WORKERS);
        for n in 0..WORKERS {
            let (server, stopping) = (server.clone(), stopping.clone());
            let worker = std::thread::Builder::new()
                .name(format!("telemetry-{n}"))
                .spawn(move || serve(&server, &stopping, upstream));
            match worker {
                Ok(worker) => workers.push(worker),
                Err(err) => tracing::warn!("cannot start a telemetry page thread: {err}"),
            }
        }
        tracing::info!("telemetry page at http://{bound}/");
        Ok(TelemetryFront {
            address: bound,
            upstream,
            server,
            stopping,
            workers,
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
        self.server.unblock();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// A loopback port nothing listens on now. steady_state binds it a moment later; in the
/// unlikely case that something else took it meanwhile, steady_state logs that it cannot
/// bind and the page answers 502.
fn free_loopback_port() -> std::io::Result<SocketAddr> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()
}

fn serve(server: &Server, stopping: &AtomicBool, upstream: SocketAddr) {
    while !stopping.load(Ordering::Acquire) {
        match server.recv_timeout(STOP_POLL) {
            Ok(Some(request)) => answer(request, upstream),
            Ok(None) => {}
            Err(err) => {
                tracing::warn!("the telemetry page stopped accepting requests: {err}");
                return;
            }
        }
    }
}

fn answer(request: Request, upstream: SocketAddr) {
    let result = match request.method() {
        Method::Get | Method::Head => {
            let url = request.url().to_owned();
            if path_of(&url) == format!("/{VIZ_SCRIPT}") {
                request.respond(Response::new(
                    StatusCode(200),
                    header("Content-Type", "text/javascript")
                        .into_iter()
                        .collect(),
                    VIZ_LITE_JS,
                    Some(VIZ_LITE_JS.len()),
                    None,
                ))
            } else {
                match fetch(upstream, &url).and_then(localized) {
                    Ok(reply) => request.respond(reply.into_response()),
                    Err(err) => request.respond(
                        Response::from_string(format!(
                            "steady_state's telemetry server did not answer: {err}\n"
                        ))
                        .with_status_code(502),
                    ),
                }
            }
        }
        _ => request.respond(Response::empty(405)),
    };
    if let Err(err) = result {
        tracing::debug!("telemetry page: cannot answer a request: {err}");
    }
}

/// The path of a request URL, without its query.
fn path_of(url: &str) -> &str {
    url.split_once('?').map_or(url, |(path, _)| path)
}

/// A header, or none if `value` is not plain ASCII (as only a broken upstream would send).
fn header(name: &str, value: &str) -> Option<Header> {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).ok()
}

/// One answer of steady_state's server.
#[derive(Debug, PartialEq, Eq)]
struct Reply {
    status: u16,
    content_type: Option<String>,
    gzipped: bool,
    body: Vec<u8>,
}

impl Reply {
    fn into_response(self) -> Response<std::io::Cursor<Vec<u8>>> {
        let mut response = Response::from_data(self.body).with_status_code(self.status);
        let content_type = self.content_type.as_deref();
        if let Some(content_type) = content_type.and_then(|kind| header("Content-Type", kind)) {
            response = response.with_header(content_type);
        }
        if let Some(gzip) = header("Content-Encoding", "gzip").filter(|_| self.gzipped) {
            response = response.with_header(gzip);
        }
        response
    }
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

    #[test]
    fn the_vendored_script_is_viz_js() {
        assert!(VIZ_LITE_JS.len() > 1_000_000);
        let head = String::from_utf8_lossy(&VIZ_LITE_JS[..4096]);
        assert!(head.contains("Viz"), "{head}");
    }
}
