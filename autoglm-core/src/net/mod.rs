//! The socket layer under the HTTP server.
//!
//! - [`listener`]: TCP (IPv4/IPv6) and Unix listeners built with socket2: backlog, `SO_REUSEPORT`
//!   with one socket and one acceptor task per runtime worker (the kernel spreads connections, so
//!   no acceptor is a bottleneck), buffer sizes, `TCP_NODELAY` and keepalive on accepted sockets,
//!   and [`raise_nofile_limit`].
//! - [`conn`]: one task per connection running HTTP/1.1 or HTTP/2 (h2c prior knowledge, or h2 by
//!   ALPN under TLS) through hyper-util's auto builder; a cap on open connections (over it: an
//!   immediate 503 and close), head-size limits, header-read and idle timeouts, and graceful
//!   shutdown (stop accepting, let responses finish up to a deadline, close the rest).
//! - [`tls`]: TLS 1.3 only, rustls with the ring provider, from PEM files.
//!
//! Response bodies are whatever the application hands over as [`bytes::Bytes`] frames; hyper
//! writes them with vectored writes (chunk header + the frame), so a frame is never copied again
//! on plain connections. TLS necessarily copies once, into the encrypted record.

pub mod conn;
pub mod listener;
pub mod tls;

pub use conn::{ConnInfo, HttpHandler, HttpOptions, NetServer, NetStats};
pub use listener::{raise_nofile_limit, BindAddr, Listener, SocketOptions};
pub use tls::{server_config as tls_server_config, TlsFiles};

/// Resolves when the process receives SIGTERM or SIGINT, with the signal's name.
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = &'static str>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}
