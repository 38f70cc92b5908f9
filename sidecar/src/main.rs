//! `sidecar`: flags and environment in, [`sidecar::run`] until SIGINT or SIGTERM.

use clap::Parser;
use tokio_util::sync::CancellationToken;

fn main() -> std::process::ExitCode {
    let config = sidecar::config::Config::parse();
    let directive = sidecar::logging::directive(config.log.as_deref());
    if let Err(e) = sidecar::logging::init("--log", &directive, config.log_format) {
        eprintln!("sidecar: {e}");
        return std::process::ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "sidecar: cannot start the runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let listener = match listen(config.listen, config.reuse_port) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(listen = %config.listen, error = %e, "sidecar: cannot listen");
                return std::process::ExitCode::FAILURE;
            }
        };
        tracing::info!(listen = %config.listen, "sidecar: listening");
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            tracing::info!("sidecar: shutting down");
            stop.cancel();
        });
        match sidecar::run(listener, config, shutdown).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "sidecar: stopped");
                std::process::ExitCode::FAILURE
            }
        }
    })
}

fn listen(
    addr: std::net::SocketAddr,
    reuse_port: bool,
) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(4096)
}
