//! The TLS example run by hand (no systemd): HTTPS with rustls across
//! SIGHUP upgrades of real processes, and a certificate rotated by an
//! upgrade. The certificates are made here: a CA the clients trust, and
//! leaf certificates for `localhost` signed by it.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;

use nix::sys::signal::Signal;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, ClientConnection, StreamOwned};

use support::http::{connect, Conn, Connector, Stream};
use support::load::{Load, LoadConfig};
use support::process::{alive, reap, signal, terminate};
use support::server::{deploy, Server};
use support::{program, TIMEOUT};

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

    /// Connects and completes the handshake: the certificate the server presented, and the
    /// connection.
    fn connect(&self, addr: SocketAddr) -> (CertificateDer<'static>, Conn<Tls>) {
        let tcp = connect(addr, TIMEOUT).unwrap_or_else(|f| panic!("{f}"));
        let tls = self.handshake(tcp).unwrap();
        let cert = tls.conn.peer_certificates().expect("a certificate")[0].clone();
        (cert, Conn::over(tls))
    }

    /// A TLS client over `tcp` (its timeouts set), the handshake done.
    fn handshake(&self, mut tcp: TcpStream) -> io::Result<Tls> {
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = ClientConnection::new(self.client.clone(), name).map_err(io::Error::other)?;
        while tls.is_handshaking() {
            tls.complete_io(&mut tcp)?;
        }
        Ok(StreamOwned::new(tls, tcp))
    }

    /// The load client's connector: a TLS client over each connection.
    fn connector(self: &Arc<Self>) -> Connector {
        let pki = self.clone();
        Connector(Arc::new(move |tcp| {
            let tls: Box<dyn Stream> = Box::new(pki.handshake(tcp)?);
            Ok(tls)
        }))
    }
}

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// `GET /pid` on a new connection: the certificate it was served with and
/// the pid that answered.
fn pid_on_new_connection(pki: &Pki, addr: SocketAddr) -> (CertificateDer<'static>, u32) {
    let (cert, mut conn) = pki.connect(addr);
    let r = conn.get("/pid");
    assert_eq!(r.status, 200, "{r:?}");
    (cert, r.text().trim().parse().unwrap())
}

/// The TLS example with the certificate and key in `dir`.
fn start(dir: &Path) -> Server {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let args = [
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ];
    Server::start(program!("tls"), &args, &[])
}

#[test]
fn twenty_upgrades_under_tls_load_lose_nothing() {
    let pki = Arc::new(Pki::new());
    let certs = tempfile::tempdir().unwrap();
    let leaf = pki.issue("first", certs.path());
    let mut server = start(certs.path());
    let addr = server.addr();
    assert_eq!(
        pid_on_new_connection(&pki, addr),
        (leaf, server.pid().unwrap())
    );

    let config = LoadConfig {
        connector: Some(pki.connector()),
        ..LoadConfig::clients(4, 4)
    };
    let load = Load::start(addr, config);
    load.assert_flows(50);
    for _ in 1..=UPGRADES {
        server.upgrade_and_reap();
        load.assert_flows(50);
    }
    let report = load.stop();
    report.assert_lost_nothing(1000);
    report.assert_every_body(WELCOME);
    // Every client followed the upgrades on new connections.
    for c in &report.clients {
        assert!(c.connections > UPGRADES as u64, "{report}");
    }

    assert_eq!(terminate(server.pid().unwrap()), 0);
}

/// A certificate replaced on disk is served after an upgrade: every new
/// connection gets the new one, while a connection opened before finishes
/// its request on the old process, over the old certificate. A certificate
/// that cannot be read fails the upgrade and changes nothing.
#[test]
fn an_upgrade_rotates_the_certificate() {
    let pki = Pki::new();
    let certs = tempfile::tempdir().unwrap();
    let first = pki.issue("first", certs.path());
    let server = start(certs.path());
    let addr = server.addr();
    let old = server.pid().unwrap();

    // A keep-alive connection on the first certificate, with a request
    // begun: its head is not complete yet.
    let (cert, mut before) = pki.connect(addr);
    assert_eq!(cert, first);
    let r = before.get("/pid");
    assert_eq!(
        (r.status, r.close, r.text()),
        (200, false, format!("{old}\n"))
    );
    before.send(b"GET /pid HTTP/1.1\r\nHost: localhost\r\n");

    let second = pki.issue("second", certs.path());
    assert_ne!(first, second);
    let from = server.log.len();
    let (_, new) = server.upgrade();
    // The old process has stopped accepting once it says so.
    let draining = ["upgrade complete; draining", &format!("new_pid={new}")];
    server.log.wait_line(from, &draining, TIMEOUT);
    for _ in 0..5 {
        assert_eq!(pid_on_new_connection(&pki, addr), (second.clone(), new));
    }

    // The old process waits for the request it has begun to read.
    assert!(alive(old), "the old process left a request unanswered");
    before.send(b"\r\n");
    let r = before.read();
    assert_eq!(
        (r.status, r.close, r.text()),
        (200, true, format!("{old}\n"))
    );
    assert!(before.closed(), "nothing after the last response");
    assert_eq!(reap(old, TIMEOUT), 0);

    // A certificate that cannot be read: the new process fails, the
    // current one goes on serving with the certificate it has.
    deploy(
        &certs.path().join("cert.pem"),
        b"not a certificate\n",
        0o644,
    );
    let from = server.log.len();
    signal(new, Signal::SIGHUP);
    let log = &server.log;
    log.wait_line(from, &["upgrade failed; still serving"], TIMEOUT);
    log.wait_line(from, &["cert.pem holds no certificate"], TIMEOUT);
    assert_eq!(server.pid(), Some(new));
    assert_eq!(pid_on_new_connection(&pki, addr), (second, new));

    assert_eq!(terminate(new), 0);
}
