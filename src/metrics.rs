//! The Prometheus endpoint (`metrics=ADDRESS:PORT`, off by default): `GET /metrics`
//! answers the mount's [`Stats`] in the Prometheus text format (OpenMetrics flavour, as
//! `prometheus-client` writes it).
//!
//! Everything is read from [`Stats`] when scraped, so serving costs nothing between
//! scrapes. The server is one thread answering one connection at a time, each bounded by
//! timeouts and a size limit on the request, so a slow or hostile client can hold it for
//! seconds at most and never make it allocate much. It binds exactly the address asked
//! for; the documentation suggests a loopback one.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `filesync_fuse_operations_total` | counter | `op` (`write`, `lookup`, ...) |
//! | `filesync_captured_changes_total` | counter | `source` (`fuse`, `ebpf`, `fanotify`, `inotify`, `scan`) |
//! | `filesync_payload_bytes_total` | counter | `direction` (`sent`, `received`), `stage` (`raw`: before compression, `compressed`: as it travels) |
//! | `filesync_wire_bytes_total` | counter | `peer`, `direction`: TCP payload bytes, encrypted |
//! | `filesync_apply_latency_seconds` | histogram | from a peer's change arriving to its acknowledgement as applied |
//! | `filesync_replication_lag_seconds` | gauge | `peer`: the age of the oldest change in flight |
//! | `filesync_pending_changes` | gauge | `peer`: changes in flight (sent or received, not yet acknowledged) |
//! | `filesync_peer_connected` | gauge | `peer` |
//! | `filesync_peer_rtt_seconds` | gauge | `peer` (connected peers only) |
//! | `filesync_capture_queue_depth` | gauge | changes waiting for the pipeline |
//! | `filesync_peer_send_queue_depth` | gauge | `peer`: messages waiting in the link's queue |

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::status::{source_name, Stats};

/// How long one client may take to send its request or read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request head read; a scrape is a few hundred bytes.
const MAX_REQUEST: usize = 8 * 1024;
/// How long the server pauses after a failed accept (such as too many open files).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "cannot serve metrics on {address}: {source}; choose a free port or another address \
         with metrics=ADDRESS:PORT, or metrics=off"
    )]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// Serves `/metrics` on `address` from a thread of its own until the process ends.
/// Returns the address bound (useful when the port was 0).
pub fn serve(address: SocketAddr, stats: Arc<Stats>) -> Result<SocketAddr, MetricsError> {
    let bind_error = |source| MetricsError::Bind { address, source };
    let listener = TcpListener::bind(address).map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    let registry = registry(stats);
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    if let Err(err) = answer(stream, &registry) {
                        tracing::debug!("metrics request failed: {err}");
                    }
                }
                Err(err) => {
                    tracing::warn!("cannot accept a metrics connection: {err}");
                    std::thread::sleep(ACCEPT_ERROR_PAUSE);
                }
            }
        })
        .map_err(bind_error)?;
    tracing::info!("metrics: Prometheus text at http://{bound}/metrics");
    Ok(bound)
}

fn registry(stats: Arc<Stats>) -> Registry {
    let mut registry = Registry::default();
    registry.register(
        "filesync_apply_latency_seconds",
        "Time from a peer's change arriving to this node acknowledging it as applied",
        stats.apply_latency.clone(),
    );
    registry.register_collector(Box::new(StatsCollector(stats)));
    registry
}

/// The whole text a scrape gets.
pub fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

/// Reads one request and answers it: the metrics for `GET /metrics`, an error otherwise.
fn answer(mut stream: TcpStream, registry: &Registry) -> std::io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let head = read_head(&mut stream)?;
    let request_line = head.lines().next().unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next(), parts.next());
    let path = target.map(|t| t.split('?').next().unwrap_or(t));
    let (status, content_type, body) = match (method, path) {
        (Some("GET"), Some("/metrics")) => match render(registry) {
            Ok(text) => (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            ),
            Err(_) => (
                "500 Internal Server Error",
                "text/plain; charset=utf-8",
                "the metrics could not be encoded\n".to_owned(),
            ),
        },
        (Some("GET"), _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "only /metrics is served here\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET /metrics is served here\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.flush()
}

/// The request line and headers, up to the blank line or [`MAX_REQUEST`] bytes.
fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::with_capacity(512);
    let mut buffer = [0u8; 1024];
    while head.len() < MAX_REQUEST && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let read = stream.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        head.extend_from_slice(buffer.get(..read).unwrap_or_default());
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Everything in [`Stats`] but the histogram, read at each scrape.
#[derive(Debug)]
struct StatsCollector(Arc<Stats>);

impl Collector for StatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = &self.0;
        let report = stats.report();

        let ops: Vec<_> = stats
            .fuse_ops()
            .map(|(op, count)| (vec![("op", op.name().to_owned())], count))
            .collect();
        counters(
            &mut encoder,
            "filesync_fuse_operations",
            "FUSE requests served, by kind",
            &ops,
        )?;

        let captured: Vec<_> = stats
            .captured()
            .map(|(source, count)| (vec![("source", source_name(source).to_owned())], count))
            .collect();
        counters(
            &mut encoder,
            "filesync_captured_changes",
            "Changes captured, by the source that saw them",
            &captured,
        )?;

        let payload: Vec<_> = [
            ("sent", &stats.sent_payload),
            ("received", &stats.received_payload),
        ]
        .into_iter()
        .flat_map(|(direction, bytes)| {
            [
                ("raw", bytes.raw.load(std::sync::atomic::Ordering::Relaxed)),
                (
                    "compressed",
                    bytes.compressed.load(std::sync::atomic::Ordering::Relaxed),
                ),
            ]
            .map(|(stage, value)| {
                (
                    vec![
                        ("direction", direction.to_owned()),
                        ("stage", stage.to_owned()),
                    ],
                    value,
                )
            })
        })
        .collect();
        counters(
            &mut encoder,
            "filesync_payload_bytes",
            "File data in replicated changes, before (raw) and after (compressed) compression",
            &payload,
        )?;

        let wire: Vec<_> = report
            .peers
            .iter()
            .flat_map(|peer| {
                [("received", peer.bytes_in), ("sent", peer.bytes_out)].map(|(direction, value)| {
                    (
                        vec![
                            ("peer", peer.id.clone()),
                            ("direction", direction.to_owned()),
                        ],
                        value,
                    )
                })
            })
            .collect();
        counters(
            &mut encoder,
            "filesync_wire_bytes",
            "Bytes on the wire to and from each peer (TCP payload, encrypted)",
            &wire,
        )?;

        let per_peer = |value: &dyn Fn(&crate::status::PeerStatus) -> Option<f64>| {
            report
                .peers
                .iter()
                .filter_map(|peer| Some((vec![("peer", peer.id.clone())], value(peer)?)))
                .collect::<Vec<_>>()
        };
        gauges(
            &mut encoder,
            "filesync_replication_lag_seconds",
            "Age of the oldest change in flight to or from each peer",
            &per_peer(&|peer| Some(peer.replication_lag_ms as f64 / 1000.0)),
        )?;
        gauges(
            &mut encoder,
            "filesync_pending_changes",
            "Changes sent to or received from each peer and not yet acknowledged",
            &per_peer(&|peer| Some(peer.pending_changes as f64)),
        )?;
        gauges(
            &mut encoder,
            "filesync_peer_connected",
            "1 while the peer is connected",
            &per_peer(&|peer| Some(if peer.connected { 1.0 } else { 0.0 })),
        )?;
        gauges(
            &mut encoder,
            "filesync_peer_rtt_seconds",
            "Smoothed TCP round-trip time to each connected peer",
            &per_peer(&|peer| peer.rtt_us.map(|us| us as f64 / 1e6)),
        )?;
        gauges(
            &mut encoder,
            "filesync_peer_send_queue_depth",
            "Messages waiting in each peer's send queue",
            &per_peer(&|peer| Some(peer.send_queue as f64)),
        )?;
        let depth = ConstGauge::new(stats.capture_queue_depth() as f64);
        depth.encode(encoder.encode_descriptor(
            "filesync_capture_queue_depth",
            "Captured changes waiting for the pipeline",
            None,
            depth.metric_type(),
        )?)?;
        Ok(())
    }
}

type Labelled<T> = (Vec<(&'static str, String)>, T);

fn counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[Labelled<u64>],
) -> Result<(), std::fmt::Error> {
    let kind = ConstCounter::new(0u64).metric_type();
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in values {
        ConstCounter::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauges(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[Labelled<f64>],
) -> Result<(), std::fmt::Error> {
    let kind = ConstGauge::new(0.0f64).metric_type();
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in values {
        ConstGauge::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::FuseOp;

    #[test]
    fn renders_counters_and_the_histogram() {
        let stats = Arc::new(Stats::new(
            "/srv".into(),
            "/mnt".into(),
            "sendreceive".into(),
        ));
        stats.count_fuse_op(FuseOp::Write);
        stats.count_captured(crate::change::Source::Fuse);
        stats.sent_payload.add(100, 40);
        stats.apply_latency.observe(0.002);
        let text = render(&registry(stats)).expect("render");
        for line in [
            "filesync_fuse_operations_total{op=\"write\"} 1",
            "filesync_captured_changes_total{source=\"fuse\"} 1",
            "filesync_payload_bytes_total{direction=\"sent\",stage=\"raw\"} 100",
            "filesync_payload_bytes_total{direction=\"sent\",stage=\"compressed\"} 40",
            "filesync_apply_latency_seconds_count 1",
            "filesync_capture_queue_depth 0.0",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in:\n{text}"
            );
        }
    }

    #[test]
    fn serves_only_get_metrics() {
        let stats = Arc::new(Stats::new(
            "/srv".into(),
            "/mnt".into(),
            "sendreceive".into(),
        ));
        let address = serve("127.0.0.1:0".parse().expect("address"), stats).expect("serve");
        let ask = |request: &str| {
            let mut stream = TcpStream::connect(address).expect("connect");
            stream.write_all(request.as_bytes()).expect("send");
            let mut answer = String::new();
            stream.read_to_string(&mut answer).expect("read");
            answer
        };
        let metrics = ask("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(metrics.starts_with("HTTP/1.1 200 OK\r\n"), "{metrics}");
        assert!(metrics.contains("filesync_fuse_operations_total"));
        assert!(ask("GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(ask("POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
    }
}
