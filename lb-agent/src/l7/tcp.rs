//! TCP–PROXY: a backend picked by the pool's scheduler (the next one when it cannot be
//! reached), a PROXY protocol header naming the client and the address it reached, then the
//! bytes both ways until either side closes.
use std::{net::SocketAddr, sync::atomic::Ordering, time::Duration};

use log::{debug, warn};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
    sync::watch,
};

use super::{io::proxy_header, Service};
use crate::config::l7::DEFAULT_POOL;

pub async fn relay<S>(
    mut downstream: S,
    client: SocketAddr,
    reached: SocketAddr,
    service: &Service,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let config = &service.config;
    let Some(pool) = service.pools.get(DEFAULT_POOL).or_else(|| service.pools.values().next()) else { return };
    let key = pool.hash_key(client.ip(), |_| None);
    let mut tried = Vec::new();
    let mut upstream = None;
    for _ in 0..pool.backends.len().clamp(1, 3) {
        let Some(backend) = pool.pick(key, &tried) else { break };
        tried.push(backend.id);
        match tokio::time::timeout(config.timeouts.connect, TcpStream::connect(backend.address)).await {
            Ok(Ok(stream)) => {
                upstream = Some((stream, backend));
                break;
            }
            Ok(Err(e)) => warn!("l7 {}: backend {} unreachable: {e}", config.name, backend.address),
            Err(_) => warn!(
                "l7 {}: backend {} did not accept within {:?}",
                config.name, backend.address, config.timeouts.connect
            ),
        }
        backend.counts.connect_failures.fetch_add(1, Ordering::Relaxed);
    }
    let Some((mut up, backend)) = upstream else {
        service.stats.requests.connect_failures.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let _busy = backend.busy();
    let _ = up.set_nodelay(true);
    let header = match proxy_header(config.proxy_protocol, client, reached) {
        Ok(h) => h,
        Err(e) => {
            warn!("l7 {}: {e:#}", config.name);
            return;
        }
    };
    if up.write_all(&header).await.is_err() {
        return;
    }
    backend.counts.count_status(200);
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut downstream, &mut up) => {
            if let Err(e) = result {
                debug!("l7 {}: relay {client} <-> {}: {e}", config.name, backend.address);
            }
        }
        _ = async {
            let _ = stop.changed().await;
            tokio::time::sleep(config.timeouts.drain).await;
        } => debug!("l7 {}: relay {client} closed at the end of the drain", config.name),
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), up.shutdown()).await;
}
