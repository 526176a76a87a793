//! Listening sockets built with socket2, so every option is set before `listen()`.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, TcpKeepalive, Type};

use crate::error::{Error, Result};

/// Where to listen: a TCP address (IPv4 or IPv6) or a Unix socket path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum BindAddr {
    /// `host:port` or `[v6]:port`; port 0 picks a free one.
    Tcp(SocketAddr),
    /// A Unix domain socket at this path (a stale socket file there is replaced).
    Unix(PathBuf),
}

impl std::str::FromStr for BindAddr {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if let Some(path) = s.strip_prefix("unix:") {
            return Ok(BindAddr::Unix(PathBuf::from(path)));
        }
        s.parse().map(BindAddr::Tcp).map_err(|_| {
            Error::config(
                "listen",
                format!("{s:?} (expected host:port, [v6]:port or unix:/path)"),
            )
        })
    }
}

impl TryFrom<String> for BindAddr {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<BindAddr> for String {
    fn from(a: BindAddr) -> String {
        a.to_string()
    }
}

impl std::fmt::Display for BindAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BindAddr::Tcp(a) => write!(f, "{a}"),
            BindAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Socket options of the listeners and of every accepted TCP connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SocketOptions {
    /// Length of the kernel's queue of connections not yet accepted (capped by `somaxconn`).
    pub backlog: u32,
    /// Bind one socket per acceptor with `SO_REUSEPORT`, letting the kernel spread connections;
    /// otherwise (the default) one socket is shared. Opt-in because `SO_REUSEPORT` also lets any
    /// other process of the same user bind the port and silently take a share of the
    /// connections (a second server on the same port got 7 requests in 10); without it a port in
    /// use fails to bind.
    pub reuse_port: bool,
    /// Acceptor tasks per address (usually the number of runtime workers).
    pub acceptors: usize,
    /// `TCP_NODELAY` on accepted connections: send each SSE chunk at once instead of waiting to
    /// coalesce (Nagle), which would add up to 40 ms per token with delayed ACKs.
    pub nodelay: bool,
    /// TCP keepalive idle time before the first probe; `None` leaves keepalive off.
    #[serde(with = "secs_opt")]
    pub keepalive: Option<Duration>,
    /// `SO_SNDBUF` in bytes; `None` keeps the kernel's autotuning.
    pub send_buffer_size: Option<usize>,
    /// `SO_RCVBUF` in bytes; `None` keeps the kernel's autotuning.
    pub recv_buffer_size: Option<usize>,
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions {
            backlog: 1024,
            reuse_port: false,
            acceptors: 1,
            nodelay: true,
            keepalive: Some(Duration::from_secs(60)),
            send_buffer_size: None,
            recv_buffer_size: None,
        }
    }
}

/// `Option<Duration>` as a number of seconds (fractions allowed) in config files.
pub(crate) mod secs_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let v: Option<f64> = Option::deserialize(d)?;
        match v {
            Some(x) if x.is_finite() && x >= 0.0 => Ok(Some(Duration::from_secs_f64(x))),
            Some(x) => Err(serde::de::Error::custom(format!(
                "{x} is not a valid number of seconds"
            ))),
            None => Ok(None),
        }
    }
}

/// A bound, listening socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(tokio::net::TcpListener),
    /// Unix domain socket.
    Unix(tokio::net::UnixListener),
}

impl Listener {
    /// The address actually bound (with the port the kernel chose for port 0).
    pub fn local_addr(&self) -> io::Result<BindAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(BindAddr::Tcp),
            Listener::Unix(l) => {
                let addr = l.local_addr()?;
                let path = addr.as_pathname().map(PathBuf::from).unwrap_or_default();
                Ok(BindAddr::Unix(path))
            }
        }
    }
}

fn io_err(addr: &BindAddr, what: &str, e: io::Error) -> Error {
    Error::Io {
        path: PathBuf::from(format!("{what} {addr}")),
        source: e,
    }
}

/// Binds `addr` for `opts.acceptors` acceptors: that many `SO_REUSEPORT` sockets, or one.
/// Must run inside a tokio runtime.
pub fn bind(addr: &BindAddr, opts: &SocketOptions) -> Result<Vec<Listener>> {
    match addr {
        BindAddr::Tcp(sa) => {
            let copies = if opts.reuse_port {
                opts.acceptors.max(1)
            } else {
                1
            };
            let first = bind_tcp(*sa, opts).map_err(|e| io_err(addr, "bind", e))?;
            // Port 0: the copies must share the port the kernel gave the first socket.
            let actual = first.local_addr().map_err(|e| io_err(addr, "bind", e))?;
            let mut out = vec![Listener::Tcp(first)];
            for _ in 1..copies {
                let l = bind_tcp(actual, opts).map_err(|e| io_err(addr, "bind", e))?;
                out.push(Listener::Tcp(l));
            }
            Ok(out)
        }
        BindAddr::Unix(path) => {
            remove_stale_socket(path).map_err(|e| io_err(addr, "bind", e))?;
            let l = bind_unix(path, opts).map_err(|e| io_err(addr, "bind", e))?;
            Ok(vec![Listener::Unix(l)])
        }
    }
}

fn bind_tcp(sa: SocketAddr, opts: &SocketOptions) -> io::Result<tokio::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(sa), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if opts.reuse_port {
        socket.set_reuse_port(true)?;
    }
    // Buffer sizes set on the listener are inherited by accepted sockets, and must be set before
    // listen() for the receive window scale to follow them.
    if let Some(n) = opts.send_buffer_size {
        socket.set_send_buffer_size(n)?;
    }
    if let Some(n) = opts.recv_buffer_size {
        socket.set_recv_buffer_size(n)?;
    }
    // On Linux accepted sockets inherit TCP_NODELAY and the keepalive settings from the
    // listener, which saves their setsockopt calls on every accept (see `tune_accepted`).
    if opts.nodelay {
        socket.set_tcp_nodelay(true)?;
    }
    if let Some(ka) = keepalive(opts) {
        socket.set_tcp_keepalive(&ka)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&SockAddr::from(sa))?;
    socket.listen(opts.backlog.min(i32::MAX as u32) as i32)?;
    tokio::net::TcpListener::from_std(socket.into())
}

fn bind_unix(path: &std::path::Path, opts: &SocketOptions) -> io::Result<tokio::net::UnixListener> {
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    if let Some(n) = opts.send_buffer_size {
        socket.set_send_buffer_size(n)?;
    }
    if let Some(n) = opts.recv_buffer_size {
        socket.set_recv_buffer_size(n)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&SockAddr::unix(path)?)?;
    socket.listen(opts.backlog.min(i32::MAX as u32) as i32)?;
    let std: std::os::unix::net::UnixListener = socket.into();
    tokio::net::UnixListener::from_std(std)
}

/// Removes a leftover socket file so a restart can bind again: only a socket (never a regular
/// file) that no server accepts on any more. A live server's socket is an error (`AddrInUse`):
/// unlinking it would take over its path, and the old server would delete the new one's when it
/// stops.
fn remove_stale_socket(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "a running server accepts on this socket",
            )),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
            Err(e) => Err(e),
        },
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "a file that is not a socket is in the way",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// What identifies a socket file: device, inode and change time to the nanosecond (filesystems
/// hand a freed inode number straight to the next file, so the inode alone does not).
pub(crate) type SocketFileId = (u64, u64, i64, i64);

/// Identifies the socket file a listener created, so that a server removes only its own file at
/// exit, never one another server has since bound at the same path.
pub(crate) fn socket_file_id(path: &std::path::Path) -> Option<SocketFileId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

/// Removes the socket file at `path` if it is still the one `id` names.
pub(crate) fn remove_own_socket(path: &std::path::Path, id: Option<SocketFileId>) {
    if id.is_some() && socket_file_id(path) == id {
        let _ = std::fs::remove_file(path);
    }
}

fn keepalive(opts: &SocketOptions) -> Option<TcpKeepalive> {
    opts.keepalive.map(|idle| {
        TcpKeepalive::new()
            .with_time(idle)
            .with_interval(Duration::from_secs(10).min(idle.max(Duration::from_secs(1))))
    })
}

/// Applies the per-connection options to an accepted TCP stream, where it did not inherit them
/// from its listener (Linux passes them on; other systems may not).
pub(crate) fn tune_accepted(
    stream: &tokio::net::TcpStream,
    opts: &SocketOptions,
) -> io::Result<()> {
    if cfg!(target_os = "linux") {
        return Ok(());
    }
    if opts.nodelay {
        stream.set_nodelay(true)?;
    }
    if let Some(ka) = keepalive(opts) {
        SockRef::from(stream).set_tcp_keepalive(&ka)?;
    }
    Ok(())
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, so the connection cap, not the fd limit,
/// decides how many clients are served. Returns the (old, new) soft limits.
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let old = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit; the kernel only reads it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((old, lim.rlim_cur))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reuseport_copies_share_the_port_and_options_stick() {
        let opts = SocketOptions {
            acceptors: 3,
            reuse_port: true,
            backlog: 64,
            recv_buffer_size: Some(1 << 16),
            send_buffer_size: Some(1 << 16),
            keepalive: Some(Duration::from_secs(7)),
            ..Default::default()
        };
        let ls = bind(&"127.0.0.1:0".parse().unwrap(), &opts).unwrap();
        assert_eq!(ls.len(), 3);
        let addrs: Vec<_> = ls.iter().map(|l| l.local_addr().unwrap()).collect();
        assert!(addrs.windows(2).all(|w| w[0] == w[1]));
        let Listener::Tcp(l) = &ls[0] else { panic!() };
        let s = SockRef::from(l);
        assert!(s.reuse_port().unwrap());
        // Linux doubles the requested size for bookkeeping.
        assert!(s.recv_buffer_size().unwrap() >= 1 << 16);
        let BindAddr::Tcp(sa) = &addrs[0] else {
            panic!()
        };
        let client = tokio::net::TcpStream::connect(sa).await.unwrap();
        let accepted = loop {
            // The kernel picks one of the three sockets.
            let mut found = None;
            for l in &ls {
                let Listener::Tcp(l) = l else { unreachable!() };
                if let Ok(Ok((s, _))) =
                    tokio::time::timeout(Duration::from_millis(20), l.accept()).await
                {
                    found = Some(s);
                    break;
                }
            }
            if let Some(s) = found {
                break s;
            }
        };
        tune_accepted(&accepted, &opts).unwrap();
        // On Linux these come from the listener alone (tune_accepted sets nothing there).
        assert!(opts.nodelay);
        assert!(accepted.nodelay().unwrap());
        let s = SockRef::from(&accepted);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(7));
        drop(client);
    }

    #[tokio::test]
    async fn unix_sockets_replace_stale_files_but_not_others() {
        let dir = std::env::temp_dir().join(format!("autoglm-listener-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.sock");
        let addr = BindAddr::Unix(path.clone());
        let first = bind(&addr, &SocketOptions::default()).unwrap();
        drop(first);
        // The socket file is left behind; binding again replaces it.
        assert!(path.exists());
        let again = bind(&addr, &SocketOptions::default()).unwrap();
        assert_eq!(again[0].local_addr().unwrap(), addr);
        let file = dir.join("plain");
        std::fs::write(&file, "x").unwrap();
        assert!(bind(&BindAddr::Unix(file), &SocketOptions::default()).is_err());
        assert_eq!(
            "unix:/x/y".parse::<BindAddr>().unwrap(),
            BindAddr::Unix("/x/y".into())
        );
        assert!("nonsense".parse::<BindAddr>().is_err());
        assert_eq!(
            "[::1]:80".parse::<BindAddr>().unwrap().to_string(),
            "[::1]:80"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn nofile_limit_is_raised_to_the_hard_limit() {
        let (_, new) = raise_nofile_limit().unwrap();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `lim` is a valid, writable rlimit.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(lim.rlim_cur, new);
        assert_eq!(lim.rlim_cur, lim.rlim_max);
    }

    #[tokio::test]
    async fn a_port_in_use_is_an_error_unless_reuse_port_is_asked_for() {
        let opts = SocketOptions {
            acceptors: 2,
            ..Default::default()
        };
        assert!(!opts.reuse_port, "reuse_port must be opt-in");
        let first = bind(&"127.0.0.1:0".parse().unwrap(), &opts).unwrap();
        assert_eq!(first.len(), 1, "one listener shared by the acceptors");
        let port = first[0].local_addr().unwrap();
        let e = bind(&port, &opts).expect_err("the port is taken");
        assert!(e.to_string().contains(&port.to_string()), "{e}");
        // Even a second server that asks for SO_REUSEPORT cannot join a socket that did not.
        let shared = SocketOptions {
            reuse_port: true,
            ..opts.clone()
        };
        assert!(bind(&port, &shared).is_err());
    }

    #[tokio::test]
    async fn a_live_unix_socket_is_never_taken_over_and_only_our_own_file_is_removed() {
        let dir = std::env::temp_dir().join(format!("autoglm-uds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let addr = BindAddr::Unix(path.clone());
        let opts = SocketOptions::default();
        let live = bind(&addr, &opts).unwrap();
        let e = bind(&addr, &opts).expect_err("a live server socket");
        assert!(e.to_string().contains("s.sock"), "{e}");
        assert!(e.to_string().contains("running server"), "{e}");
        assert!(path.exists(), "the live socket was not unlinked");
        // Once nothing accepts on it, the file is stale and a restart binds again.
        let old_id = socket_file_id(&path);
        drop(live);
        let new = bind(&addr, &opts).unwrap();
        assert_ne!(socket_file_id(&path), old_id, "a new socket file");
        // The old server removing "its" socket at exit leaves the new server's alone.
        remove_own_socket(&path, old_id);
        assert!(path.exists());
        remove_own_socket(&path, socket_file_id(&path));
        assert!(!path.exists());
        drop(new);
        // A regular file is never removed.
        std::fs::write(&path, b"data").unwrap();
        assert!(bind(&addr, &opts).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
