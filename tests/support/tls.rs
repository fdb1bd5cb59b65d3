//! TLS clients for tests: rustls (ring) over a blocking socket for HTTP/1.1, and the `h2`
//! crate over tokio-rustls for HTTP/2. The test certificates are those of `certs/`.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A file of `certs/`.
pub fn cert_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("certs")
        .join(name)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts any server certificate (the tests look at which one was served instead).
#[derive(Debug)]
struct AnyCert;

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// How a test client connects.
#[derive(Clone, Default)]
pub struct Client {
    /// Verify the server against `certs/ca.crt` (else accept any certificate).
    pub verify: bool,
    pub alpn: Vec<Vec<u8>>,
    /// Client certificate and key files of `certs/`.
    pub identity: Option<(&'static str, &'static str)>,
    /// Offer TLS 1.2 only.
    pub tls12_only: bool,
}

impl Client {
    pub fn config(&self) -> ClientConfig {
        let versions: &[&rustls::SupportedProtocolVersion] = if self.tls12_only {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS12, &rustls::version::TLS13]
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .expect("versions");
        let builder = if self.verify {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(cert_file("ca.crt")).expect("ca") {
                roots.add(c.expect("ca cert")).expect("add ca");
            }
            builder.with_root_certificates(roots)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCert))
        };
        let mut cfg = match self.identity {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_file_iter(cert_file(cert))
                    .expect("client cert")
                    .collect::<Result<Vec<_>, _>>()
                    .expect("client cert pem");
                let key = PrivateKeyDer::from_pem_file(cert_file(key)).expect("client key");
                builder
                    .with_client_auth_cert(chain, key)
                    .expect("client auth")
            }
            None => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = self.alpn.clone();
        cfg
    }

    /// Connects and completes the handshake. `sni`: a DNS name, or None (no SNI sent).
    pub fn connect(
        &self,
        addr: SocketAddr,
        sni: Option<&str>,
    ) -> Result<StreamOwned<ClientConnection, TcpStream>, String> {
        let name: ServerName<'static> = match sni {
            Some(n) => ServerName::try_from(n.to_string()).map_err(|e| e.to_string())?,
            None => ServerName::IpAddress(addr.ip().into()),
        };
        let conn =
            ClientConnection::new(Arc::new(self.config()), name).map_err(|e| e.to_string())?;
        let sock = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let mut tls = StreamOwned::new(conn, sock);
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .map_err(|e| e.to_string())?;
        }
        Ok(tls)
    }
}

/// The DER of the first certificate of a PEM file of `certs/` (to compare with what a
/// server sent).
pub fn der_of(file: &str) -> Vec<u8> {
    CertificateDer::pem_file_iter(cert_file(file))
        .expect("pem")
        .next()
        .expect("a certificate")
        .expect("pem cert")
        .as_ref()
        .to_vec()
}

/// The leaf certificate the server sent.
pub fn served(tls: &StreamOwned<ClientConnection, TcpStream>) -> Vec<u8> {
    tls.conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
        .unwrap_or_default()
}

/// An HTTP/1.1 GET over a TLS stream: (status, raw head and body as text).
pub fn https_get(
    tls: &mut StreamOwned<ClientConnection, TcpStream>,
    host: &str,
    path: &str,
) -> Result<(u16, String), String> {
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    tls.flush().map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    match tls.read_to_end(&mut buf) {
        Ok(_) => {}
        // Servers that close without close_notify: what arrived counts.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => {}
        Err(e) => return Err(e.to_string()),
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no HTTP answer: {text:?}"))?;
    Ok((status, text))
}

/// One HTTP/2 GET over TLS (ALPN h2), in a runtime of its own, then `after` with the
/// connection's driver task (it ends when the connection closes).
fn h2_exchange<T>(
    addr: SocketAddr,
    path: &str,
    after: impl AsyncFnOnce(tokio::task::JoinHandle<Result<(), h2::Error>>) -> T,
) -> (u16, Option<Vec<u8>>, String, T) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = Client {
            alpn: vec![b"h2".to_vec()],
            ..Client::default()
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client.config()));
        let sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::try_from("localhost").expect("name");
        let tls = connector.connect(name, sock).await.expect("TLS handshake");
        let alpn = tls.get_ref().1.alpn_protocol().map(|p| p.to_vec());
        let (mut send, conn) = h2::client::handshake(tls).await.expect("h2 handshake");
        let driver = tokio::spawn(conn);
        let req = http::Request::builder()
            .uri(format!("https://localhost{path}"))
            .body(())
            .expect("request");
        let (resp, _) = send.send_request(req, true).expect("send");
        let resp = resp.await.expect("response");
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let mut out = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("body");
            let _ = body.flow_control().release_capacity(chunk.len());
            out.extend_from_slice(&chunk);
        }
        drop(body);
        let then = after(driver).await;
        drop(send);
        (
            status,
            alpn,
            String::from_utf8_lossy(&out).into_owned(),
            then,
        )
    })
}

/// An HTTP/2 GET over TLS (ALPN h2): (status, negotiated protocol, body).
pub fn h2_get(addr: SocketAddr, path: &str) -> (u16, Option<Vec<u8>>, String) {
    let (status, alpn, body, ()) = h2_exchange(addr, path, async |_| ());
    (status, alpn, body)
}

/// One HTTP/2 GET over TLS, then the connection is left idle: its status, and how long after
/// the answer the server closed the connection (`None`: still open after `within`).
pub fn h2_get_then_idle(addr: SocketAddr, path: &str, within: Duration) -> (u16, Option<Duration>) {
    let (status, _, _, closed) = h2_exchange(addr, path, async |driver| {
        let answered = std::time::Instant::now();
        tokio::time::timeout(within, driver)
            .await
            .ok()
            .map(|_| answered.elapsed())
    });
    (status, closed)
}
