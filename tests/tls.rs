//! The TLS example run by hand (no systemd): HTTPS with rustls across
//! SIGHUP upgrades of real processes, and a certificate rotated by an
//! upgrade. The certificates are made here: a CA the clients trust, and
//! leaf certificates for `localhost` signed by it.

#[path = "support/load.rs"]
mod load;
#[path = "support/server.rs"]
mod server;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, ClientConnection, StreamOwned};

use server::{alive, become_subreaper, deploy, fresh_example, reap, wait_for, Server};

const T: Duration = Duration::from_secs(30);
const UPGRADES: usize = 20;
const WELCOME: &str = "Welcome to the Home Page!\n";

/// A CA of the test's own, and the client settings that trust it.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    client: Arc<ClientConfig>,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "handover test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let client =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        Pki {
            ca,
            client: Arc::new(client),
        }
    }

    /// A leaf certificate for `localhost` named `name`, written (PEM) to
    /// `dir/cert.pem` and `dir/key.pem` the way a deploy does (write aside,
    /// rename). Returns the certificate as the server will present it.
    fn issue(&self, name: &str, dir: &Path) -> CertificateDer<'static> {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        deploy(&dir.join("key.pem"), key.serialize_pem().as_bytes(), 0o600);
        deploy(&dir.join("cert.pem"), cert.pem().as_bytes(), 0o644);
        cert.der().clone()
    }

    /// Connects and completes the handshake, with the timeouts set.
    fn connect(&self, addr: SocketAddr) -> io::Result<Tls> {
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        self.handshake(tcp)
    }

    fn handshake(&self, mut tcp: TcpStream) -> io::Result<Tls> {
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        tcp.set_write_timeout(Some(Duration::from_secs(10)))?;
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = ClientConnection::new(self.client.clone(), name).map_err(io::Error::other)?;
        while tls.is_handshaking() {
            tls.complete_io(&mut tcp)?;
        }
        Ok(StreamOwned::new(tls, tcp))
    }

    /// The load client's connector: a TLS client over each connection.
    fn connector(self: &Arc<Self>) -> load::Connector {
        let pki = self.clone();
        load::Connector(Arc::new(move |tcp| {
            let tls: Box<dyn load::Stream> = Box::new(pki.handshake(tcp)?);
            Ok(tls)
        }))
    }
}

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// The certificate the server presented on `tls`.
fn presented(tls: &Tls) -> CertificateDer<'static> {
    tls.conn.peer_certificates().expect("a certificate")[0].clone()
}

/// Reads one response (status line, headers, a `Content-Length` body):
/// status, whether it says `Connection: close`, body.
fn response(r: &mut impl BufRead) -> (u16, bool, String) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line.split(' ').nth(1).unwrap().parse().unwrap();
    let (mut len, mut close) = (0, false);
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end().to_ascii_lowercase();
        if l.is_empty() {
            break;
        }
        if let Some(v) = l.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
        close |= l.starts_with("connection:") && l.contains("close");
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).unwrap();
    (status, close, String::from_utf8(body).unwrap())
}

/// `GET /pid` on a new connection: the certificate it was served with and
/// the pid that answered.
fn pid_on_new_connection(pki: &Pki, addr: SocketAddr) -> (CertificateDer<'static>, u32) {
    let mut tls = pki.connect(addr).unwrap();
    let cert = presented(&tls);
    tls.write_all(b"GET /pid HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (status, close, body) = response(&mut BufReader::new(&mut tls));
    assert_eq!((status, close), (200, true), "{body}");
    (cert, body.trim().parse().unwrap())
}

fn start(dir: &Path) -> Server {
    let (cert, key): (PathBuf, PathBuf) = (dir.join("cert.pem"), dir.join("key.pem"));
    let args = [
        "--addr",
        "127.0.0.1:0",
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ];
    Server::start(&fresh_example("tls"), &args, &[])
}

/// Waits until the load has completed `n` more requests: traffic flows.
fn flows(load: &load::Load, n: u64) {
    let since = load.ok();
    wait_for("requests to flow", T, || {
        (load.ok() >= since + n).then_some(())
    });
}

#[test]
fn twenty_upgrades_under_tls_load_lose_nothing() {
    become_subreaper();
    let pki = Arc::new(Pki::new());
    let certs = tempfile::tempdir().unwrap();
    let leaf = pki.issue("first", certs.path());
    let server = start(certs.path());
    let addr = server.addr();
    assert_eq!(
        pid_on_new_connection(&pki, addr),
        (leaf, server.pid().unwrap())
    );

    let load = load::Load::start(
        addr,
        load::LoadConfig {
            keepalive_clients: 4,
            per_request_clients: 4,
            connector: Some(pki.connector()),
            ..load::LoadConfig::default()
        },
    );
    flows(&load, 50);
    for i in 1..=UPGRADES {
        let (old, _new) = server.upgrade(T);
        let code = reap(old, T);
        assert_eq!(code, 0, "upgrade {i}: old process {old} exited with {code}");
        flows(&load, 50);
    }
    let report = load.stop();
    eprintln!("{report}");
    report.assert_no_errors();
    assert!(
        report.ok > 1000,
        "too little load to prove anything: {report}"
    );
    assert_eq!(
        report.body(WELCOME).map(|b| b.count),
        Some(report.ok),
        "{report}"
    );
    // Every client followed the upgrades on new connections.
    for c in &report.clients {
        assert!(c.connections > UPGRADES as u64, "{report}");
    }

    let last = server.pid().unwrap();
    kill(Pid::from_raw(last as i32), Signal::SIGTERM).unwrap();
    assert_eq!(reap(last, T), 0);
}

/// A certificate replaced on disk is served after an upgrade: every new
/// connection gets the new one, while a connection opened before finishes
/// its request on the old process, over the old certificate. A certificate
/// that cannot be read fails the upgrade and changes nothing.
#[test]
fn an_upgrade_rotates_the_certificate() {
    become_subreaper();
    let pki = Pki::new();
    let certs = tempfile::tempdir().unwrap();
    let first = pki.issue("first", certs.path());
    let server = start(certs.path());
    let addr = server.addr();
    let old = server.pid().unwrap();

    // A keep-alive connection on the first certificate, with a request
    // begun: its head is not complete yet.
    let mut before = pki.connect(addr).unwrap();
    assert_eq!(presented(&before), first);
    before
        .write_all(b"GET /pid HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let (status, close, body) = response(&mut BufReader::new(&mut before));
    assert_eq!((status, close, body), (200, false, format!("{old}\n")));
    before
        .write_all(b"GET /pid HTTP/1.1\r\nHost: localhost\r\n")
        .unwrap();
    before.flush().unwrap();

    let second = pki.issue("second", certs.path());
    assert_ne!(first, second);
    let from = server.log.len();
    let (_, new) = server.upgrade(T);
    // The old process has stopped accepting once it says so.
    server.log.wait_line(
        from,
        &["upgrade complete; draining", &format!("new_pid={new}")],
        T,
    );
    for _ in 0..5 {
        assert_eq!(pid_on_new_connection(&pki, addr), (second.clone(), new));
    }

    // The old process waits for the request it has begun to read.
    assert!(alive(old), "the old process left a request unanswered");
    before.write_all(b"\r\n").unwrap();
    let (status, close, body) = response(&mut BufReader::new(&mut before));
    assert_eq!((status, close, body), (200, true, format!("{old}\n")));
    let mut rest = Vec::new();
    before.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "nothing after the last response");
    assert_eq!(reap(old, T), 0);

    // A certificate that cannot be read: the new process fails, the
    // current one goes on serving with the certificate it has.
    deploy(
        &certs.path().join("cert.pem"),
        b"not a certificate\n",
        0o644,
    );
    let from = server.log.len();
    kill(Pid::from_raw(new as i32), Signal::SIGHUP).unwrap();
    server
        .log
        .wait_line(from, &["upgrade failed; still serving"], T);
    server
        .log
        .wait_line(from, &["cert.pem holds no certificate"], T);
    assert_eq!(server.pid(), Some(new));
    assert_eq!(pid_on_new_connection(&pki, addr), (second, new));

    kill(Pid::from_raw(new as i32), Signal::SIGTERM).unwrap();
    assert_eq!(reap(new, T), 0);
}
