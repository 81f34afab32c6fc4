//! The Prometheus text endpoint: counters of the data path and the state of every backend.
//! The HTTP task asks the main loop for a rendering, so the agent's state has one owner.
use std::{fmt::Write as _, net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result};
use log::{info, warn};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::{mpsc, oneshot},
};

use crate::agent::Agent;

/// A scrape waiting for the main loop's rendering.
pub struct Scrape(pub oneshot::Sender<String>);

/// Renders every metric in the Prometheus text format (version 0.0.4).
pub fn render(agent: &Agent) -> Result<String> {
    let mut out = String::new();
    let dp = &agent.dataplane;
    let reasons = dp.reason_counters()?;
    family(&mut out, "xlb_frames_total", "counter", "Frames by the reason of the data path's verdict.");
    for (reason, c) in &reasons {
        writeln!(out, "xlb_frames_total{{reason=\"{}\"}} {}", reason.name(), c.packets)?;
    }
    family(&mut out, "xlb_frame_bytes_total", "counter", "Bytes of frames by the reason of the verdict.");
    for (reason, c) in &reasons {
        writeln!(out, "xlb_frame_bytes_total{{reason=\"{}\"}} {}", reason.name(), c.bytes)?;
    }
    family(&mut out, "xlb_flow_events_total", "counter", "Flow-table events (hit, new, rate_limited, stale, closed).");
    for (event, n) in dp.flow_counters()? {
        writeln!(out, "xlb_flow_events_total{{event=\"{}\"}} {n}", event.name())?;
    }
    if let Some(entries) = dp.flow_table_entries() {
        family(&mut out, "xlb_flow_table_entries", "gauge", "Flows in the flow table (counted every few seconds).");
        writeln!(out, "xlb_flow_table_entries {entries}")?;
        family(&mut out, "xlb_flow_table_size", "gauge", "Capacity of the flow table.");
        writeln!(out, "xlb_flow_table_size {}", dp.flow_table_size()?)?;
    }
    family(&mut out, "xlb_service_packets_total", "counter", "Packets forwarded per service.");
    let mut bytes = String::new();
    family(&mut bytes, "xlb_service_bytes_total", "counter", "Bytes forwarded per service.");
    for s in agent.services() {
        let c = dp.service_counters(s.id.0)?;
        let labels = service_labels(s);
        writeln!(out, "xlb_service_packets_total{{{labels}}} {}", c.packets)?;
        writeln!(bytes, "xlb_service_bytes_total{{{labels}}} {}", c.bytes)?;
    }
    out += &bytes;
    family(
        &mut out,
        "xlb_service_fail_open",
        "gauge",
        "1 while fewer than min_healthy backends are up and failing ones stay in.",
    );
    for s in agent.services() {
        writeln!(out, "xlb_service_fail_open{{{}}} {}", service_labels(s), u8::from(s.fail_open))?;
    }
    let (mut packets, mut bytes, mut up, mut weight) = (String::new(), String::new(), String::new(), String::new());
    let (mut new_flows, mut retransmits, mut active) = (String::new(), String::new(), String::new());
    family(
        &mut active,
        "xlb_backend_active_flows",
        "gauge",
        "Flows pinned to the backend and not closed, as the data path counts them for lc/wlc \
         (reconciled with the flow table every few seconds).",
    );
    family(&mut new_flows, "xlb_backend_new_flows_total", "counter", "Flows given to the backend.");
    family(
        &mut retransmits,
        "xlb_backend_syn_retransmits_total",
        "counter",
        "SYNs sent again on flows pinned to the backend (the passive health signal).",
    );
    family(&mut packets, "xlb_backend_packets_total", "counter", "Packets forwarded per backend.");
    family(&mut bytes, "xlb_backend_bytes_total", "counter", "Bytes forwarded per backend.");
    family(&mut up, "xlb_backend_up", "gauge", "1 when the backend passes its health checks.");
    family(&mut weight, "xlb_backend_weight", "gauge", "Configured weight (0: draining).");
    for s in agent.services() {
        for b in &s.backends {
            let labels = format!("{},backend=\"{}\"", service_labels(s), b.config.address);
            let c = dp.backend_counters(b.id.0)?;
            writeln!(packets, "xlb_backend_packets_total{{{labels}}} {}", c.packets)?;
            writeln!(bytes, "xlb_backend_bytes_total{{{labels}}} {}", c.bytes)?;
            writeln!(up, "xlb_backend_up{{{labels}}} {}", u8::from(b.up))?;
            writeln!(weight, "xlb_backend_weight{{{labels}}} {}", b.config.weight)?;
            let flows = dp.backend_flows(b.id.0)?;
            writeln!(new_flows, "xlb_backend_new_flows_total{{{labels}}} {}", flows.new_flows)?;
            writeln!(retransmits, "xlb_backend_syn_retransmits_total{{{labels}}} {}", flows.syn_retransmits)?;
            writeln!(active, "xlb_backend_active_flows{{{labels}}} {}", dp.active_flows(b.id.0)?)?;
        }
    }
    Ok(out + &packets + &bytes + &up + &weight + &new_flows + &retransmits + &active)
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn service_labels(s: &crate::agent::ServiceState) -> String {
    let c = &s.config;
    format!("service=\"{}\",vip=\"{}\",port=\"{}\",protocol=\"{}\"", escape(&c.name), c.vip, c.port, c.protocol)
}

/// Label values escape backslash, double quote and newline.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Serves GET /metrics on `addr` until the main loop goes away.
pub async fn serve(addr: SocketAddr, scrapes: mpsc::Sender<Scrape>) -> Result<()> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("cannot listen for metrics on {addr}"))?;
    info!("metrics on http://{addr}/metrics");
    loop {
        let (mut conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("metrics: accept failed: {e}");
                continue;
            }
        };
        let scrapes = scrapes.clone();
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut request)).await;
            let Ok(Ok(n)) = read else { return };
            let line = String::from_utf8_lossy(&request[..n]);
            let response = if line.starts_with("GET /metrics ") || line.starts_with("GET / ") {
                let (tx, rx) = oneshot::channel();
                if scrapes.send(Scrape(tx)).await.is_err() {
                    return;
                }
                let Ok(body) = rx.await else { return };
                format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
            } else {
                warn!("metrics: {peer} asked for something else than GET /metrics");
                "HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string()
            };
            let _ = conn.write_all(response.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("x\ny"), "x\\ny");
    }
}
