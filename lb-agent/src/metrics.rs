//! The Prometheus endpoint: counters of the data path and the state of every backend, in the
//! OpenMetrics text format (prometheus-client), served over HTTP/1 by hyper. The HTTP task asks
//! the main loop for a snapshot, so the agent's state keeps one owner; the snapshot is encoded
//! off the main loop.
use std::{convert::Infallible, net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{
    body::Bytes, header::CONTENT_TYPE, server::conn::http1, service::service_fn, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use log::{info, warn};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Registry,
};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};

use crate::agent::{Agent, ServiceState};

/// A scrape waiting for the main loop's snapshot.
pub struct Scrape(pub oneshot::Sender<Result<Snapshot, String>>);

type Labels = Vec<(&'static str, String)>;

/// One metric family: its samples as read at the scrape.
#[derive(Debug)]
struct Family {
    /// Without the `_total` a counter's samples carry.
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    samples: Vec<(Labels, u64)>,
}

/// A histogram's samples: per label set, the sum, the count and (bound, count) per bucket.
#[derive(Debug)]
struct Histograms {
    name: &'static str,
    help: &'static str,
    samples: Vec<(Labels, f64, u64, Vec<(f64, u64)>)>,
}

/// Every metric's value at one scrape.
#[derive(Debug, Default)]
pub struct Snapshot {
    families: Vec<Family>,
    histograms: Vec<Histograms>,
}

impl Snapshot {
    fn family(&mut self, name: &'static str, kind: MetricType, help: &'static str) -> &mut Vec<(Labels, u64)> {
        self.families.push(Family { name, help, kind, samples: Vec::new() });
        &mut self.families.last_mut().expect("just pushed").samples
    }

    /// The OpenMetrics text of the snapshot.
    pub fn encode(self) -> Result<String> {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).context("cannot encode the metrics")?;
        Ok(out)
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let value_of = |kind: MetricType, value: u64, sample: MetricEncoder| match kind {
            MetricType::Counter => ConstCounter::new(value).encode(sample),
            _ => ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(sample),
        };
        for f in &self.families {
            let mut family = encoder.encode_descriptor(f.name, f.help, None, f.kind)?;
            match f.samples.as_slice() {
                // One sample without labels: `name value`, not `name{} value`.
                [(labels, value)] if labels.is_empty() => value_of(f.kind, *value, family)?,
                samples => {
                    for (labels, value) in samples {
                        // prometheus-client writes label values as they are: a service name is
                        // the operator's text, and must not break the exposition.
                        let labels: Labels = labels.iter().map(|(k, v)| (*k, escape(v))).collect();
                        value_of(f.kind, *value, family.encode_family(&labels)?)?;
                    }
                }
            }
        }
        for h in &self.histograms {
            let mut family = encoder.encode_descriptor(h.name, h.help, None, MetricType::Histogram)?;
            for (labels, sum, count, buckets) in &h.samples {
                let labels: Labels = labels.iter().map(|(k, v)| (*k, escape(v))).collect();
                family
                    .encode_family(&labels)?
                    .encode_histogram::<prometheus_client::encoding::NoLabelSet>(*sum, *count, buckets, None)?;
            }
        }
        Ok(())
    }
}

/// A label value with backslash, double quote and newline escaped, as the text format wants.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn service_labels(s: &ServiceState) -> Labels {
    let c = &s.config;
    vec![
        ("service", c.name.clone()),
        ("vip", c.vip.to_string()),
        ("port", c.port.to_string()),
        ("protocol", c.protocol.to_string()),
    ]
}

/// Reads every metric of the data path and the agent (on the main loop: it owns the agent).
pub fn snapshot(agent: &Agent) -> Result<Snapshot> {
    use MetricType::{Counter, Gauge};
    let dp = &agent.dataplane;
    let mut snap = Snapshot::default();
    let reasons = dp.reason_counters()?;
    let frames = snap.family("xlb_frames", Counter, "Frames by the reason of the data path's verdict.");
    frames.extend(reasons.iter().map(|(r, c)| (vec![("reason", r.name().to_string())], c.packets)));
    let bytes = snap.family("xlb_frame_bytes", Counter, "Bytes of frames by the reason of the verdict.");
    bytes.extend(reasons.iter().map(|(r, c)| (vec![("reason", r.name().to_string())], c.bytes)));
    let events = snap.family(
        "xlb_flow_events",
        Counter,
        "Flow-table events (hit, new, rate_limited, stale, closed, other_cpu: a pin found in another CPU's table).",
    );
    events.extend(dp.flow_counters()?.into_iter().map(|(e, n)| (vec![("event", e.name().to_string())], n)));
    snap.family(
        "xlb_route_changes",
        Counter,
        "Batches of route, neighbour, address or link changes after which every CPU asked the FIB for its next hops again.",
    )
    .push((Vec::new(), dp.route_changes()));
    if let Some(entries) = dp.flow_table_entries() {
        snap.family("xlb_flow_table_entries", Gauge, "Flows in the flow table (counted every few seconds).")
            .push((Vec::new(), entries));
        snap.family("xlb_flow_table_size", Gauge, "Capacity of the flow table.")
            .push((Vec::new(), u64::from(dp.flow_table_size()?)));
    }

    let mut service_packets = Vec::new();
    let mut service_bytes = Vec::new();
    let mut fail_open = Vec::new();
    let (mut packets, mut bytes, mut up, mut weight) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut new_flows, mut retransmits, mut active) = (Vec::new(), Vec::new(), Vec::new());
    let (mut pinned, mut established, mut ejections) = (Vec::new(), Vec::new(), Vec::new());
    for s in agent.services() {
        let c = dp.service_counters(s.id.0)?;
        let labels = service_labels(s);
        service_packets.push((labels.clone(), c.packets));
        service_bytes.push((labels.clone(), c.bytes));
        fail_open.push((labels.clone(), u64::from(s.fail_open)));
        for b in &s.backends {
            let mut labels = labels.clone();
            labels.push(("backend", b.config.address.to_string()));
            let c = dp.backend_counters(b.id.0)?;
            let flows = dp.backend_flows(b.id.0)?;
            packets.push((labels.clone(), c.packets));
            bytes.push((labels.clone(), c.bytes));
            up.push((labels.clone(), u64::from(b.up)));
            weight.push((labels.clone(), u64::from(b.config.weight)));
            new_flows.push((labels.clone(), flows.new_flows));
            retransmits.push((labels.clone(), flows.syn_retransmits));
            pinned.push((labels.clone(), flows.syn_pinned));
            established.push((labels.clone(), flows.established));
            ejections.push((labels.clone(), b.ejections_total));
            active.push((labels, dp.active_flows(b.id.0)?));
        }
    }
    *snap.family("xlb_service_packets", Counter, "Packets forwarded per service.") = service_packets;
    *snap.family("xlb_service_bytes", Counter, "Bytes forwarded per service.") = service_bytes;
    *snap.family(
        "xlb_service_fail_open",
        Gauge,
        "1 while fewer than min_healthy backends are up and failing ones stay in.",
    ) = fail_open;
    *snap.family("xlb_backend_packets", Counter, "Packets forwarded per backend.") = packets;
    *snap.family("xlb_backend_bytes", Counter, "Bytes forwarded per backend.") = bytes;
    *snap.family("xlb_backend_up", Gauge, "1 when the backend passes its health checks.") = up;
    *snap.family("xlb_backend_weight", Gauge, "Configured weight (0: draining).") = weight;
    *snap.family("xlb_backend_new_flows", Counter, "Flows given to the backend.") = new_flows;
    *snap.family(
        "xlb_backend_syn_retransmits",
        Counter,
        "SYNs sent again on flows pinned to the backend (the passive health signal).",
    ) = retransmits;
    *snap.family("xlb_backend_syn_pinned", Counter, "TCP flows pinned to the backend on their SYN.") = pinned;
    *snap.family(
        "xlb_backend_handshakes",
        Counter,
        "Of those, the ones whose client sent the handshake's ACK (the backend answered).",
    ) = established;
    *snap.family("xlb_backend_ejections", Counter, "Times the in-band signal held the backend out.") = ejections;
    *snap.family(
        "xlb_backend_active_flows",
        Gauge,
        "Flows pinned to the backend and not closed, as the data path counts them for lc/wlc (reconciled with the \
         flow table every few seconds).",
    ) = active;
    l7_metrics(agent, &mut snap);
    if let Some(bgp) = agent.speaker().map(|s| s.view()) {
        *snap.family("xlb_vip_announced", Gauge, "1 while BIRD announces the VIP (draining included).") =
            bgp.vips.iter().map(|v| (vec![("vip", v.vip.to_string())], u64::from(v.state != "withdrawn"))).collect();
        snap.family("xlb_bgp_host_draining", Gauge, "1 from ctl drain-host until undrain-host.")
            .push((Vec::new(), u64::from(bgp.host != "serving")));
        *snap.family("xlb_bgp_session_up", Gauge, "1 while the BGP session with the neighbour is established.") =
            bgp.sessions.iter().map(|s| (vec![("neighbor", s.neighbor.clone())], u64::from(s.up))).collect();
    }
    Ok(snap)
}

/// The L7 services: requests by status class, durations, connections, TLS failures, and each
/// backend's state.
fn l7_metrics(agent: &Agent, snap: &mut Snapshot) {
    use std::sync::atomic::Ordering::Relaxed;
    use MetricType::{Counter, Gauge};
    let (mut requests, mut up, mut in_flight, mut failures) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut active, mut connections, mut tls, mut durations) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (config, stats, backends) in agent.l7.services() {
        let service = vec![("service", config.name.clone())];
        active.push((service.clone(), stats.active.load(Relaxed).max(0) as u64));
        connections.push((service.clone(), stats.connections.load(Relaxed)));
        tls.push((service.clone(), stats.tls_failures.load(Relaxed)));
        let mut cumulative = 0;
        let mut buckets = Vec::new();
        for (i, bound) in crate::l7::DURATION_BUCKETS.iter().enumerate() {
            cumulative += stats.durations[i].load(Relaxed);
            buckets.push((*bound, stats.durations[i].load(Relaxed)));
        }
        let last = stats.durations[crate::l7::DURATION_BUCKETS.len()].load(Relaxed);
        buckets.push((f64::INFINITY, last));
        let sum = stats.duration_sum_us.load(Relaxed) as f64 / 1e6;
        durations.push((service.clone(), sum, cumulative + last, buckets));
        for b in backends {
            let labels =
                vec![("service", config.name.clone()), ("backend", b.address.to_string()), ("pool", b.pool.clone())];
            for (class, c) in b.counts.by_class.iter().enumerate() {
                let mut l = labels.clone();
                l.push(("class", format!("{}xx", class + 1)));
                requests.push((l, c.load(Relaxed)));
            }
            up.push((labels.clone(), u64::from(b.is_up())));
            in_flight.push((labels.clone(), b.in_flight.load(Relaxed).max(0) as u64));
            failures.push((labels, b.counts.connect_failures.load(Relaxed)));
        }
    }
    if active.is_empty() {
        return;
    }
    *snap.family("xlb_l7_requests", Counter, "L7 responses per backend by status class (tcp-proxy: relays as 2xx).") =
        requests;
    *snap.family("xlb_l7_backend_up", Gauge, "1 when the L7 backend passes its health checks.") = up;
    *snap.family("xlb_l7_backend_in_flight", Gauge, "Requests (or relays) in progress on the L7 backend.") = in_flight;
    *snap.family(
        "xlb_l7_connect_failures",
        Counter,
        "Connections to the L7 backend that failed (then retried elsewhere).",
    ) = failures;
    *snap.family("xlb_l7_active_connections", Gauge, "Client connections open on the L7 service.") = active;
    *snap.family("xlb_l7_connections", Counter, "Client connections accepted by the L7 service.") = connections;
    *snap.family("xlb_l7_tls_handshake_failures", Counter, "TLS handshakes that failed or timed out.") = tls;
    snap.histograms.push(Histograms {
        name: "xlb_l7_request_duration_seconds",
        help: "Time from a request's headers to its response's headers, per L7 service.",
        samples: durations,
    });
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Answers one request: GET /metrics (or /) with a fresh snapshot, 404 otherwise.
async fn respond(request: Request<hyper::body::Incoming>, scrapes: mpsc::Sender<Scrape>) -> Response<Full<Bytes>> {
    let status = |code: StatusCode, text: &str| {
        let mut r = Response::new(Full::new(Bytes::from(text.to_string())));
        *r.status_mut() = code;
        r
    };
    if request.method() != hyper::Method::GET || !matches!(request.uri().path(), "/metrics" | "/") {
        return status(StatusCode::NOT_FOUND, "only GET /metrics here\n");
    }
    let (tx, rx) = oneshot::channel();
    if scrapes.send(Scrape(tx)).await.is_err() {
        return status(StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping\n");
    }
    let encoded = match rx.await {
        Ok(Ok(snapshot)) => tokio::task::spawn_blocking(move || snapshot.encode()).await,
        Ok(Err(e)) => return status(StatusCode::INTERNAL_SERVER_ERROR, &format!("cannot read the maps: {e}\n")),
        Err(_) => return status(StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping\n"),
    };
    match encoded {
        Ok(Ok(text)) => {
            let mut r = Response::new(Full::new(Bytes::from(text)));
            r.headers_mut().insert(CONTENT_TYPE, hyper::header::HeaderValue::from_static(OPENMETRICS));
            r
        }
        Ok(Err(e)) => status(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:#}\n")),
        Err(e) => status(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
    }
}

/// Serves GET /metrics on `addr` until the main loop goes away.
pub async fn serve(addr: SocketAddr, scrapes: mpsc::Sender<Scrape>) -> Result<()> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("cannot listen for metrics on {addr}"))?;
    info!("metrics on http://{addr}/metrics");
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("metrics: accept failed: {e}");
                continue;
            }
        };
        let scrapes = scrapes.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let scrapes = scrapes.clone();
                async move { Ok::<_, Infallible>(respond(request, scrapes).await) }
            });
            let conn = http1::Builder::new()
                .header_read_timeout(Duration::from_secs(5))
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(TokioIo::new(conn), service);
            if let Err(e) = conn.await {
                log::debug!("metrics: connection from {peer}: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_encode_as_openmetrics_with_escaped_labels() {
        let mut snap = Snapshot::default();
        snap.family("xlb_frames", MetricType::Counter, "Frames.").push((vec![("reason", "tx".into())], 5));
        snap.family("xlb_backend_up", MetricType::Gauge, "Up.").push((vec![("service", "a\"b\\c\nd".into())], 1));
        let text = snap.encode().unwrap();
        assert!(text.contains("# TYPE xlb_frames counter\n"), "{text}");
        assert!(text.contains("xlb_frames_total{reason=\"tx\"} 5\n"), "{text}");
        assert!(text.contains("xlb_backend_up{service=\"a\\\"b\\\\c\\nd\"} 1\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");

        let mut snap = Snapshot::default();
        snap.family("xlb_flow_table_size", MetricType::Gauge, "Size.").push((Vec::new(), 7));
        let text = snap.encode().unwrap();
        assert!(text.contains("\nxlb_flow_table_size 7\n"), "{text}");
    }
}
