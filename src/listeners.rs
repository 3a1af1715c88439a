//! Listening sockets: taken from what was passed in (by systemd or by our
//! parent) when present, else bound; each one remembered by name so that
//! the next upgrade can hand it on.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    self, sockopt, AddressFamily, SockFlag, SockType, SockaddrLike, SockaddrStorage,
};

use crate::error::{Error, Result};
use crate::protocol::env::{Activation, UNNAMED};
use crate::sys;

/// The kinds of socket a listener can be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Tcp,
    Udp,
    UnixStream,
    UnixDatagram,
}

impl Kind {
    fn sock_type(self) -> SockType {
        match self {
            Kind::Tcp | Kind::UnixStream => SockType::Stream,
            Kind::Udp | Kind::UnixDatagram => SockType::Datagram,
        }
    }
    fn is_inet(self) -> bool {
        matches!(self, Kind::Tcp | Kind::Udp)
    }
    fn describe(self) -> &'static str {
        match self {
            Kind::Tcp => "a listening TCP socket",
            Kind::Udp => "a UDP socket",
            Kind::UnixStream => "a listening Unix stream socket",
            Kind::UnixDatagram => "a Unix datagram socket",
        }
    }
}

/// Where a listener should be.
#[derive(Debug, Clone)]
pub(crate) enum Address {
    Inet(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Inet(a) => a.fmt(f),
            Address::Unix(p) => p.display().fmt(f),
        }
    }
}

impl Address {
    /// Whether a socket bound at `actual` serves what was asked. Port 0 and
    /// the unspecified address ask for "any".
    fn accepts(&self, actual: &Address) -> bool {
        match (self, actual) {
            (Address::Inet(want), Address::Inet(got)) => {
                (want.port() == 0 || want.port() == got.port())
                    && (want.ip() == got.ip()
                        || (want.ip().is_unspecified() && got.ip().is_unspecified()))
            }
            (Address::Unix(want), Address::Unix(got)) => want == got,
            _ => false,
        }
    }
}

/// A socket passed to this process, not yet claimed by a `listen_*` call.
#[derive(Debug)]
pub(crate) struct Inherited {
    pub(crate) fd: OwnedFd,
    /// The fd number it arrived at (for messages).
    pub(crate) number: RawFd,
    pub(crate) name: String,
    /// Who decided its address.
    pub(crate) source: Source,
}

/// Who decided a passed socket's address: that decides what an address
/// mismatch means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// systemd (or `systemd-socket-activate`): its `.socket` unit decides
    /// the address, so a different one is only a warning. Also a socket our
    /// parent got that way: the manager's decision outlives generations.
    Manager,
    /// Our own parent, which bound it from its configuration: a different
    /// address means the configuration changed, so the listener is bound
    /// anew and the old one closed after `ready()`.
    Parent,
}

/// Takes the fds `activation` describes: close-on-exec from now on, so
/// that no other child of this process inherits them. Returns the
/// listeners, each with who decided its address, and the handoff channel.
pub(crate) fn take(activation: Activation) -> Result<(Vec<Inherited>, Option<OwnedFd>)> {
    let raw: Vec<RawFd> = activation
        .fds
        .iter()
        .map(|(fd, _)| *fd)
        .chain(activation.channel)
        .collect();
    let mut owned = sys::take_inherited(&raw).map_err(|e| Error::io("take inherited fds", e))?;
    for fd in &owned {
        nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(|e| Error::io("set FD_CLOEXEC on inherited fds", e.into()))?;
    }
    // The channel is the last fd taken, when there is one.
    let channel = match activation.channel {
        Some(_) => owned.pop(),
        None => None,
    };
    let configured = activation.configured;
    let inherited = owned
        .into_iter()
        .zip(activation.fds)
        .map(|(fd, (number, name))| {
            let source = if configured.contains(&name) {
                Source::Parent
            } else {
                Source::Manager
            };
            Inherited {
                fd,
                number,
                name,
                source,
            }
        })
        .collect();
    Ok((inherited, channel))
}

/// Gives `inherited` back as it was found, after a failed `build()`: open,
/// inheritable (close-on-exec cleared), owned by nothing in this process.
pub(crate) fn give_back(inherited: Vec<Inherited>) {
    for i in inherited {
        let cleared = nix::fcntl::fcntl(
            &i.fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        );
        if let Err(e) = cleared {
            tracing::debug!(fd = i.number, error = %e, "cannot clear FD_CLOEXEC on an inherited fd");
        }
        let _ = std::os::fd::IntoRawFd::into_raw_fd(i.fd);
    }
}

/// The first address `addr` resolves to, for the listener `name`.
pub(crate) fn resolve(name: &str, addr: impl ToSocketAddrs) -> Result<SocketAddr> {
    let bind_err = |cause| Error::Bind {
        name: name.to_owned(),
        addr: "the given address".into(),
        cause,
    };
    addr.to_socket_addrs()
        .map_err(bind_err)?
        .next()
        .ok_or_else(|| {
            bind_err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no address",
            ))
        })
}

/// The listeners of this process.
#[derive(Debug)]
pub(crate) struct Listeners {
    passed: Vec<Option<Inherited>>,
    /// A duplicate of every listener in use, by name, for the next handoff.
    active: Vec<(String, OwnedFd)>,
    /// The names of the listeners this process bound itself.
    bound_here: Vec<String>,
    /// The names of the listeners whose address this program decided: bound
    /// here, or passed by a parent that had (`Source::Parent`).
    configured: Vec<String>,
}

/// The control socket's name in `LISTEN_FDNAMES`; no user listener may
/// take it.
pub(crate) const CONTROL_NAME: &str = "handover-control";

fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 255
        || name.contains(':')
        || name.chars().any(char::is_control)
    {
        return Err(Error::InvalidName(name.to_owned()));
    }
    Ok(())
}

fn local_address(fd: BorrowedFd<'_>) -> std::io::Result<Option<Address>> {
    let addr: SockaddrStorage = socket::getsockname(fd.as_raw_fd())?;
    Ok(match addr.family() {
        Some(AddressFamily::Inet) => addr
            .as_sockaddr_in()
            .map(|a| Address::Inet(SocketAddr::V4(std::net::SocketAddrV4::from(*a)))),
        Some(AddressFamily::Inet6) => addr
            .as_sockaddr_in6()
            .map(|a| Address::Inet(SocketAddr::V6(std::net::SocketAddrV6::from(*a)))),
        Some(AddressFamily::Unix) => addr
            .as_unix_addr()
            .map(|u| Address::Unix(u.path().map(Path::to_owned).unwrap_or_default())),
        _ => None,
    })
}

/// Checks that `fd` is a socket of `kind`; returns its local address.
fn inspect(fd: BorrowedFd<'_>, kind: Kind) -> std::result::Result<Address, String> {
    let ty = socket::getsockopt(&fd, sockopt::SockType).map_err(|e| format!("SO_TYPE: {e}"))?;
    if ty != kind.sock_type() {
        return Err(format!("is {ty:?}, not {}", kind.describe()));
    }
    if ty == SockType::Stream
        && !socket::getsockopt(&fd, sockopt::AcceptConn)
            .map_err(|e| format!("SO_ACCEPTCONN: {e}"))?
    {
        return Err(format!("is not listening, not {}", kind.describe()));
    }
    let addr = local_address(fd).map_err(|e| format!("getsockname: {e}"))?;
    match addr {
        Some(a @ Address::Inet(_)) if kind.is_inet() => Ok(a),
        Some(a @ Address::Unix(_)) if !kind.is_inet() => Ok(a),
        _ => Err(format!(
            "has the wrong address family for {}",
            kind.describe()
        )),
    }
}

impl Listeners {
    pub(crate) fn new(passed: Vec<Inherited>) -> Listeners {
        Listeners {
            passed: passed.into_iter().map(Some).collect(),
            active: Vec::new(),
            bound_here: Vec::new(),
            configured: Vec::new(),
        }
    }

    /// Finds the passed fd for `name`: by name, else the first unnamed one.
    fn claim(
        &mut self,
        name: &str,
        kind: Kind,
        want: &Address,
    ) -> Result<Option<(OwnedFd, Source)>> {
        let by_name = self
            .passed
            .iter()
            .position(|p| p.as_ref().is_some_and(|p| p.name == name));
        // Unnamed fds go to the user's listen_* calls in order, never to the
        // control socket, which only ever takes its own name.
        let unnamed = || {
            self.passed
                .iter()
                .position(|p| p.as_ref().is_some_and(|p| p.name == UNNAMED))
        };
        let Some(i) = by_name.or_else(|| {
            if name == CONTROL_NAME {
                None
            } else {
                unnamed()
            }
        }) else {
            return Ok(None);
        };
        let Some(p) = self.passed.get(i).and_then(Option::as_ref) else {
            return Ok(None);
        };
        let actual = inspect(p.fd.as_fd(), kind).map_err(|problem| Error::InheritedSocket {
            name: p.name.clone(),
            fd: p.number,
            problem,
        })?;
        if !want.accepts(&actual) {
            match p.source {
                Source::Parent => {
                    tracing::info!(name, old = %actual, new = %want, "listener address changed; binding anew");
                    return Ok(None);
                }
                Source::Manager => {
                    tracing::warn!(name, asked = %want, serving = %actual, "the socket unit's address differs from the configured one; serving the socket unit's");
                }
            }
        }
        let Some(p) = self.passed.get_mut(i).and_then(Option::take) else {
            return Ok(None);
        };
        tracing::debug!(name, fd = p.number, address = %actual, "using inherited listener");
        Ok(Some((p.fd, p.source)))
    }

    fn add(&mut self, name: &str, kind: Kind, want: Address) -> Result<OwnedFd> {
        self.add_with(name, kind, want, None)
    }

    /// [`add`](Self::add); a socket bound here gets file mode `mode` (Unix
    /// sockets only).
    fn add_with(
        &mut self,
        name: &str,
        kind: Kind,
        want: Address,
        mode: Option<nix::sys::stat::Mode>,
    ) -> Result<OwnedFd> {
        check_name(name)?;
        if name == CONTROL_NAME && kind != Kind::UnixStream {
            return Err(Error::InvalidName(name.to_owned()));
        }
        if self.active.iter().any(|(n, _)| n == name) {
            return Err(Error::DuplicateName(name.to_owned()));
        }
        let fd = match self.claim(name, kind, &want)? {
            Some((fd, source)) => {
                if source == Source::Parent {
                    self.configured.push(name.to_owned());
                }
                fd
            }
            None => {
                let fd = bind(kind, &want, mode).map_err(|source| Error::Bind {
                    name: name.to_owned(),
                    addr: want.to_string(),
                    cause: source,
                })?;
                self.bound_here.push(name.to_owned());
                self.configured.push(name.to_owned());
                fd
            }
        };
        // tokio needs O_NONBLOCK; an inherited fd may lack it (it lives on
        // the shared open file description, so every holder sees it).
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|e| Error::io("read fd flags", e.into()))?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))
            .map_err(|e| Error::io("set O_NONBLOCK", e.into()))?;
        let dup = fd.try_clone().map_err(|e| Error::io("dup listener", e))?;
        self.active.push((name.to_owned(), dup));
        Ok(fd)
    }

    pub(crate) fn tcp(&mut self, name: &str, addr: SocketAddr) -> Result<TcpListener> {
        self.add(name, Kind::Tcp, Address::Inet(addr))
            .map(TcpListener::from)
    }

    pub(crate) fn udp(&mut self, name: &str, addr: SocketAddr) -> Result<UdpSocket> {
        self.add(name, Kind::Udp, Address::Inet(addr))
            .map(UdpSocket::from)
    }

    pub(crate) fn unix(&mut self, name: &str, path: &Path) -> Result<UnixListener> {
        self.add(name, Kind::UnixStream, Address::Unix(path.to_owned()))
            .map(UnixListener::from)
    }

    /// The control socket at `path`: inherited by name, or bound here with
    /// file mode 0600 from the start (see [`bind`]), so that nothing is ever
    /// `chmod`ed by path.
    pub(crate) fn control(&mut self, path: &Path) -> Result<UnixListener> {
        let private = nix::sys::stat::Mode::from_bits_truncate(0o600);
        self.add_with(
            CONTROL_NAME,
            Kind::UnixStream,
            Address::Unix(path.to_owned()),
            Some(private),
        )
        .map(UnixListener::from)
    }

    pub(crate) fn unix_datagram(&mut self, name: &str, path: &Path) -> Result<UnixDatagram> {
        self.add(name, Kind::UnixDatagram, Address::Unix(path.to_owned()))
            .map(UnixDatagram::from)
    }

    /// Whether this process bound `name` itself (it was not passed in).
    pub(crate) fn bound_here(&self, name: &str) -> bool {
        self.bound_here.iter().any(|n| n == name)
    }

    /// The passed fds no `listen_*` call claimed, for [`give_back`].
    pub(crate) fn into_unclaimed(mut self) -> Vec<Inherited> {
        self.passed.drain(..).flatten().collect()
    }

    /// Closes every passed fd no `listen_*` call claimed; returns their names.
    pub(crate) fn close_unclaimed(&mut self) -> Vec<String> {
        self.passed.drain(..).flatten().map(|p| p.name).collect()
    }

    /// The names of the listeners in use whose address this program decided
    /// (see [`Source`]), for the next generation's `HANDOVER_CONFIGURED`.
    pub(crate) fn configured(&self) -> Vec<&str> {
        self.active
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| self.configured.iter().any(|c| c == n))
            .collect()
    }

    /// The listeners to hand to a new process, in order.
    pub(crate) fn for_handoff(&self) -> Vec<(&str, BorrowedFd<'_>)> {
        self.active
            .iter()
            .map(|(n, fd)| (n.as_str(), fd.as_fd()))
            .collect()
    }

    /// Forgets (closes our duplicates of) every listener: after a handoff or
    /// on stop. The sockets live on wherever else they are open.
    pub(crate) fn clear(&mut self) {
        self.active.clear();
        self.passed.clear();
    }
}

/// Binds a new socket for `addr`. With `mode`, a Unix socket's file is
/// created with that mode: Linux gives the file `bind` creates the mode of
/// the socket's own inode (set here with `fchmod` before `bind`), less the
/// umask. Changing it afterwards by path could change another file, if
/// someone replaced the socket file with a symlink in between.
fn bind(
    kind: Kind,
    addr: &Address,
    mode: Option<nix::sys::stat::Mode>,
) -> std::io::Result<OwnedFd> {
    let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
    let fd = match addr {
        Address::Inet(a) => {
            let family = if a.is_ipv4() {
                AddressFamily::Inet
            } else {
                AddressFamily::Inet6
            };
            let fd = socket::socket(family, kind.sock_type(), flags, None)?;
            if kind == Kind::Tcp {
                socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
            }
            socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(*a))?;
            fd
        }
        Address::Unix(path) => {
            remove_stale(path, kind);
            let fd = socket::socket(AddressFamily::Unix, kind.sock_type(), flags, None)?;
            if let Some(mode) = mode {
                nix::sys::stat::fchmod(&fd, mode)?;
            }
            socket::bind(fd.as_raw_fd(), &socket::UnixAddr::new(path.as_path())?)?;
            fd
        }
    };
    if kind.sock_type() == SockType::Stream {
        socket::listen(&fd, socket::Backlog::MAXCONN)?;
    }
    Ok(fd)
}

/// Removes a socket file nobody listens on any more (left by a process that
/// was killed). A live socket, or a file that is not a socket, is left for
/// `bind` to refuse.
fn remove_stale(path: &Path, kind: Kind) {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if !meta.file_type().is_socket() {
        return;
    }
    let refused = |r: std::io::Result<()>| matches!(r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused);
    let stale = match kind {
        Kind::UnixDatagram => UnixDatagram::unbound()
            .map(|s| refused(s.connect(path)))
            .unwrap_or(false),
        _ => refused(std::os::unix::net::UnixStream::connect(path).map(drop)),
    };
    if stale {
        tracing::info!(path = %path.display(), "removing a stale socket file");
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passed(fd: OwnedFd, name: &str) -> Inherited {
        from(fd, name, Source::Manager)
    }

    fn from(fd: OwnedFd, name: &str, source: Source) -> Inherited {
        Inherited {
            number: fd.as_raw_fd(),
            fd,
            name: name.into(),
            source,
        }
    }

    #[test]
    fn binds_and_remembers_by_name() {
        let mut l = Listeners::new(vec![]);
        let tcp = l.tcp("http", "127.0.0.1:0".parse().unwrap()).unwrap();
        let udp = l.udp("dns", "127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(tcp.local_addr().unwrap().port() != 0);
        assert!(udp.local_addr().unwrap().port() != 0);
        let names: Vec<_> = l
            .for_handoff()
            .into_iter()
            .map(|(n, _)| n.to_owned())
            .collect();
        assert_eq!(names, ["http", "dns"]);
        assert!(matches!(
            l.tcp("http", "127.0.0.1:0".parse().unwrap()),
            Err(Error::DuplicateName(_))
        ));
        assert!(matches!(
            l.tcp("a:b", "127.0.0.1:0".parse().unwrap()),
            Err(Error::InvalidName(_))
        ));
    }

    #[test]
    fn takes_passed_sockets_by_name_then_in_order() {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let b = TcpListener::bind("127.0.0.1:0").unwrap();
        let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let mut l = Listeners::new(vec![passed(a.into(), UNNAMED), passed(b.into(), "admin")]);
        let admin = l.tcp("admin", "127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(admin.local_addr().unwrap(), b_addr);
        let http = l.tcp("http", "127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(http.local_addr().unwrap(), a_addr);
        let flags = nix::fcntl::fcntl(&http, nix::fcntl::FcntlArg::F_GETFL).unwrap();
        assert_ne!(
            flags & libc::O_NONBLOCK,
            0,
            "a passed blocking socket is made non-blocking"
        );
        assert!(l.close_unclaimed().is_empty());
    }

    #[test]
    fn a_passed_socket_of_the_wrong_kind_is_refused() {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let unbound_tcp: OwnedFd = socket::socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        let mut l = Listeners::new(vec![
            passed(udp.into(), "http"),
            passed(unbound_tcp, "admin"),
        ]);
        let e = l.tcp("http", "127.0.0.1:0".parse().unwrap()).unwrap_err();
        assert!(
            matches!(e, Error::InheritedSocket { ref problem, .. } if problem.contains("not a listening TCP")),
            "{e}"
        );
        let e = l.tcp("admin", "127.0.0.1:0".parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("not listening"), "{e}");
    }

    #[test]
    fn a_changed_address_from_the_parent_is_bound_anew() {
        let old = TcpListener::bind("127.0.0.1:0").unwrap();
        let old_addr = old.local_addr().unwrap();
        let mut l = Listeners::new(vec![from(old.into(), "http", Source::Parent)]);
        let new = l.tcp("http", "127.0.0.2:0".parse().unwrap()).unwrap();
        assert_ne!(new.local_addr().unwrap(), old_addr);
        assert_eq!(l.close_unclaimed(), ["http"]);
        assert_eq!(l.configured(), ["http"]);
    }

    #[test]
    fn the_managers_address_is_kept_across_generations() {
        // A socket unit on another port than the program's default: the
        // first process and every later one serve the socket unit's socket.
        let unit = TcpListener::bind("127.0.0.1:0").unwrap();
        let unit_addr = unit.local_addr().unwrap();
        let mut l = Listeners::new(vec![from(unit.into(), "http", Source::Manager)]);
        let ctl = l.tcp("admin", "127.0.0.1:0".parse().unwrap()).unwrap();
        let http = l.tcp("http", "127.0.0.2:8081".parse().unwrap()).unwrap();
        assert_eq!(http.local_addr().unwrap(), unit_addr);
        assert_eq!(l.configured(), ["admin"]);
        drop(ctl);
        assert!(!l.bound_here("http") && l.bound_here("admin"));
    }

    #[test]
    fn the_control_socket_never_takes_an_unnamed_fd() {
        let dir = tempfile::tempdir().unwrap();
        let user = UnixListener::bind(dir.path().join("user.sock")).unwrap();
        let mut l = Listeners::new(vec![passed(user.into(), UNNAMED)]);
        let ctl = l.unix(CONTROL_NAME, &dir.path().join("ctl.sock")).unwrap();
        let addr = ctl.local_addr().unwrap();
        assert_eq!(
            addr.as_pathname(),
            Some(dir.path().join("ctl.sock").as_path())
        );
        let user = l.unix("app", &dir.path().join("elsewhere.sock")).unwrap();
        let addr = user.local_addr().unwrap();
        assert_eq!(
            addr.as_pathname(),
            Some(dir.path().join("user.sock").as_path())
        );
    }

    #[test]
    fn unix_listeners_replace_stale_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        drop(UnixListener::bind(&path).unwrap()); // leaves a stale file
        let mut l = Listeners::new(vec![]);
        let live = l.unix("ctl", &path).unwrap();
        let mut other = Listeners::new(vec![]);
        let e = other.unix("ctl", &path).unwrap_err();
        assert!(matches!(e, Error::Bind { .. }), "{e}");
        drop(live);
        let d = dir.path().join("d.sock");
        assert!(l.unix_datagram("dgram", &d).is_ok());
    }
}
