//! A TCP proxy on loopback to a real server (NATS, PostgreSQL) that a test
//! cuts — the listener and every connection through it closed — and starts
//! again on the same port: the server going away and coming back.

use std::net::SocketAddr;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

pub struct TcpProxy {
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl TcpProxy {
    /// A proxy to `upstream` on a free loopback port.
    pub async fn start(upstream: &str) -> TcpProxy {
        TcpProxy::start_at(SocketAddr::from(([127, 0, 0, 1], 0)), upstream).await
    }

    /// A proxy to `upstream` on `addr` (the port of a proxy cut before).
    pub async fn start_at(addr: SocketAddr, upstream: &str) -> TcpProxy {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(addr).unwrap();
        let listener = socket.listen(64).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let halt = stop.clone();
        let upstream = upstream.to_string();
        tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    _ = halt.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => return },
                };
                let (halt, upstream) = (halt.clone(), upstream.clone());
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = halt.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        TcpProxy { addr, stop }
    }

    /// Closes the listener and every connection through it.
    pub fn cut(&self) {
        self.stop.cancel();
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
    }
}
