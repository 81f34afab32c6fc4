//! Accepting: a task per listener, a task per connection; PROXY headers read first when the
//! service expects them, TLS next for https, then hyper (HTTP/1.1 and HTTP/2) or the TCP relay.
//! Stopping a listener stops the accepting at once and asks every connection to finish:
//! hyper's graceful shutdown (GOAWAY, `Connection: close`), a relay gets the drain time.
use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc, RwLock},
};

use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use log::{debug, error, warn};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};

use super::{
    http::{self, Peer},
    io::{read_proxy_header, Activity, Conn},
    tcp, Service,
};
use crate::config::l7::L7Mode;

pub async fn run(listener: std::net::TcpListener, current: Arc<RwLock<Arc<Service>>>, mut stop: watch::Receiver<bool>) {
    let _ = listener.set_nonblocking(true);
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            error!("l7: cannot use the listening socket: {e}");
            return;
        }
    };
    // This thread's own upstream connections (its runtime drives them).
    let client = http::upstream(&current.read().expect("never poisoned: no panic while held").config);
    // Every connection holds a sender: when all are dropped, the drain is over.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let service = current.read().expect("never poisoned: no panic while held").clone();
                    let (stop, done, client) = (stop.clone(), done_tx.clone(), client.clone());
                    tokio::spawn(async move {
                        connection(stream, peer, service, client, stop).await;
                        drop(done);
                    });
                }
                // Out of descriptors, say: the next accept may succeed.
                Err(e) => {
                    warn!("l7: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    drop(done_tx);
    let _ = done_rx.recv().await;
}

/// Counts an open connection until dropped.
struct Open(Arc<super::Stats>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    service: Arc<Service>,
    client: http::Upstream,
    stop: watch::Receiver<bool>,
) {
    let upstream = client;
    let config = &service.config;
    service.stats.connections.fetch_add(1, Ordering::Relaxed);
    service.stats.active.fetch_add(1, Ordering::Relaxed);
    let _open = Open(service.stats.clone());
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().unwrap_or(config.listen);
    let (mut client, mut reached, mut ahead) = (peer, local, Vec::new());
    if config.accept_proxy {
        match read_proxy_header(&mut stream, config.timeouts.header_read).await {
            Ok((addrs, rest)) => {
                if let Some((c, l)) = addrs {
                    (client, reached) = (c, l);
                }
                ahead = rest;
            }
            Err(e) => {
                debug!("l7 {}: {peer}: {e:#}", config.name);
                return;
            }
        }
    }
    let activity = Activity::new();
    let io = Conn::new(stream, ahead, activity.clone());
    match config.mode {
        L7Mode::TcpProxy => tcp::relay(io, client, reached, &service, stop).await,
        L7Mode::Http => {
            let peer = Peer { client, local: reached, tls: false };
            serve(io, peer, service.clone(), upstream, activity, stop).await
        }
        L7Mode::Https => {
            let Some(tls) = service.tls.clone() else { return };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            match tokio::time::timeout(config.timeouts.header_read, acceptor.accept(io)).await {
                Ok(Ok(tls_stream)) => {
                    let peer = Peer { client, local: reached, tls: true };
                    serve(tls_stream, peer, service.clone(), upstream, activity, stop).await
                }
                Ok(Err(e)) => {
                    service.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                    debug!("l7 {}: TLS handshake with {client}: {e}", config.name);
                }
                Err(_) => {
                    service.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                    debug!("l7 {}: TLS handshake with {client} timed out", config.name);
                }
            }
        }
    }
}

/// HTTP/1.1 and HTTP/2 on one connection until it ends, idles out or the listener stops.
async fn serve<S>(
    io: S,
    peer: Peer,
    service: Arc<Service>,
    upstream: http::Upstream,
    activity: Arc<Activity>,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = &service.config;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.timeouts.header_read)
        .max_buf_size(config.limits.max_header_bytes)
        .max_headers(config.limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(config.limits.max_header_bytes as u32)
        .max_concurrent_streams(256);
    let svc = service.clone();
    let busy = activity.clone();
    let handler = service_fn(move |req| {
        let (svc, busy, upstream) = (svc.clone(), busy.clone(), upstream.clone());
        busy.busy.fetch_add(1, Ordering::Relaxed);
        async move {
            let response = http::handle(svc, upstream, peer, req).await;
            busy.busy.fetch_sub(1, Ordering::Relaxed);
            response
        }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), handler);
    tokio::pin!(conn);
    let idle = config.timeouts.idle;
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    debug!("l7 {}: connection from {}: {e}", config.name, peer.client);
                }
                return;
            }
            changed = stop.changed(), if !closing => {
                let _ = changed;
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep(activity.idle_left(idle)), if !closing => {
                if activity.idle_left(idle).is_zero() {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}
