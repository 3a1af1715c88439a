//! HTTPS on handover, with [rustls](https://docs.rs/rustls) through
//! tokio-rustls: `GET /` answers `Welcome to the Home Page!`, `GET /pid` the
//! pid of the process that served it. HTTP/2 and HTTP/1.1 (ALPN).
//!
//! The certificate chain and key are read from the files given on the
//! command line when the process starts. To rotate a certificate, replace
//! the files and upgrade: the new process reads them again and serves every
//! new connection with the new certificate, while connections already open
//! finish on the old process with the old one. A certificate that cannot be
//! read fails the upgrade, and the old process goes on serving.
//!
//! ```text
//! cargo build --example tls
//! target/debug/examples/tls --cert cert.pem --key key.pem --pid-file /tmp/tls.pid &
//! curl --cacert ca.pem https://localhost:8443/pid
//! cp new-cert.pem cert.pem; cp new-key.pem key.pem   # or a rename, atomically
//! kill -HUP "$(cat /tmp/tls.pid)"                     # or systemctl reload
//! ```
//!
//! Defaults: `--addr 127.0.0.1:8443`, no PID file. Under systemd or
//! `systemd-socket-activate` it serves the passed socket instead of `--addr`.
//! The handshake runs in each connection's own task, bounded by the
//! server's handshake timeout (10 s by default).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use axum::{routing::get, Router};
use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;

struct Args {
    addr: String,
    pid_file: Option<String>,
    cert: PathBuf,
    key: PathBuf,
}

const USAGE: &str = "usage: tls --cert PATH --key PATH [--addr ADDR] [--pid-file PATH]";

fn parse_args() -> Result<Args, String> {
    let (mut addr, mut pid_file, mut cert, mut key) =
        ("127.0.0.1:8443".to_owned(), None, None, None);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => addr = value()?,
            "--pid-file" => pid_file = Some(value()?),
            "--cert" => cert = Some(PathBuf::from(value()?)),
            "--key" => key = Some(PathBuf::from(value()?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}; {USAGE}")),
        }
    }
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Args {
            addr,
            pid_file,
            cert,
            key,
        }),
        _ => Err(format!("--cert and --key are required; {USAGE}")),
    }
}

/// The TLS settings from the PEM files: the certificate chain (leaf first)
/// and its private key (PKCS#8, PKCS#1 or SEC1).
fn tls_config(cert: &Path, key: &Path) -> Result<ServerConfig, String> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read the certificates in {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read the private key in {}: {e}", key.display()))?;
    // The ring provider: it builds with a C compiler alone.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("the certificate and key do not make a TLS identity: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Before anything else: a new process that cannot read its certificate
    // fails the upgrade, and the old one keeps serving with the old one.
    let tls = TlsAcceptor::from(Arc::new(tls_config(&args.cert, &args.key)?));
    tracing::info!(cert = %args.cert.display(), "certificate loaded");

    let mut builder = handover::Handover::builder();
    if let Some(p) = &args.pid_file {
        builder = builder.pid_file(p);
    }
    let handover = builder.build()?;
    let listener = handover.listen_tcp("https", args.addr.as_str())?;
    tracing::info!(addr = %listener.local_addr()?, generation = handover.generation(), "listening");

    let app = Router::new()
        .route("/", get(|| async { "Welcome to the Home Page!\n" }))
        .route(
            "/pid",
            get(|| async { format!("{}\n", std::process::id()) }),
        );
    let server = handover::http::Server::new();
    tokio::spawn(server.serve_with(listener, move |tcp| tls.accept(tcp), app, handover.drain()));

    handover.ready().await?;
    handover.wait().await;
    Ok(())
}

fn main() -> ExitCode {
    if let Err(e) = handover::logging::init() {
        eprintln!("tls: {e}");
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("tls: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tls: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
