//! TLS with rustls (ring provider only): certificates chosen by SNI from their SANs
//! (wildcards too), the first certificate for clients without SNI or with an unknown name,
//! optional client certificates, ALPN `h2` and `http/1.1`, and certificate files reloaded
//! when they change on disk.
//!
//! The certificate set lives behind an `ArcSwap` in the resolver rustls asks on every
//! handshake: a config reload or a renewed file swaps it, and the next handshake uses it.

use arc_swap::ArcSwap;
use rustls::crypto::ring::sign::any_supported_type;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// One certificate with its key, as loaded from a `[tls] certificates` entry.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub key: Arc<CertifiedKey>,
    /// DNS names of its subjectAltName (lowercased; `*.example.com` for wildcards).
    pub names: Vec<String>,
    /// `notAfter`, seconds since the Unix epoch.
    pub not_after: i64,
}

/// Loads a PEM certificate chain and its private key and checks that they belong together.
pub fn load_pair(cert_path: &Path, key_path: &Path) -> Result<Loaded, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| format!("cannot read certificate {}: {e}", cert_path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate: {e}", cert_path.display()))?;
    let Some(leaf) = certs.first() else {
        return Err(format!("{}: no certificate in it", cert_path.display()));
    };
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| format!("cannot read private key {}: {e}", key_path.display()))?;
    let signer = any_supported_type(&key)
        .map_err(|e| format!("{}: unsupported private key: {e}", key_path.display()))?;
    let (names, not_after) =
        leaf_facts(leaf.as_ref()).map_err(|e| format!("{}: {e}", cert_path.display()))?;
    let key = CertifiedKey::new(certs, signer);
    key.keys_match().map_err(|_| {
        format!(
            "{} is not the key of {}",
            key_path.display(),
            cert_path.display()
        )
    })?;
    Ok(Loaded {
        cert_path: cert_path.to_path_buf(),
        key_path: key_path.to_path_buf(),
        key: Arc::new(key),
        names,
        not_after,
    })
}

/// The leaf certificate's DNS names and expiry.
fn leaf_facts(der: &[u8]) -> Result<(Vec<String>, i64), String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    Ok((names, cert.validity().not_after.timestamp()))
}

/// Reads a CA bundle for client certificates.
pub fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    for c in certs {
        let c = c.map_err(|e| format!("{}: not a PEM certificate: {e}", path.display()))?;
        roots
            .add(c)
            .map_err(|e| format!("{}: not a CA certificate: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(roots)
}

/// The certificates one listener serves, indexed by name.
#[derive(Debug, Default)]
pub struct CertSet {
    pub loaded: Vec<Loaded>,
    exact: HashMap<String, usize>,
    /// `example.com` for a `*.example.com` certificate.
    wildcard: HashMap<String, usize>,
}

impl CertSet {
    pub fn new(loaded: Vec<Loaded>) -> CertSet {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (i, l) in loaded.iter().enumerate() {
            for n in &l.names {
                match n.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_string()).or_insert(i),
                    None => exact.entry(n.clone()).or_insert(i),
                };
            }
        }
        CertSet {
            loaded,
            exact,
            wildcard,
        }
    }

    /// The certificate for `sni`: an exact SAN, else a wildcard one level up, else the
    /// first certificate (also for clients that send no name).
    pub fn pick(&self, sni: Option<&str>) -> Option<&Loaded> {
        let by_name = sni.and_then(|name| {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            self.exact.get(&name).copied().or_else(|| {
                name.split_once('.')
                    .and_then(|(_, parent)| self.wildcard.get(parent).copied())
            })
        });
        self.loaded.get(by_name.unwrap_or(0))
    }
}

/// What rustls asks for a certificate on every handshake.
#[derive(Debug)]
pub struct Resolver {
    pub set: ArcSwap<CertSet>,
    /// `min_version = "1.3"` (enforced by [`VersionGate`]).
    pub tls13_only: AtomicBool,
}

impl Resolver {
    pub fn new(set: CertSet, tls13_only: bool) -> Resolver {
        Resolver {
            set: ArcSwap::from_pointee(set),
            tls13_only: AtomicBool::new(tls13_only),
        }
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self.set.load();
        set.pick(hello.server_name()).map(|l| l.key.clone())
    }
}

/// `min_version = "1.3"`: rustls as Pingora builds it offers 1.2 and 1.3, and tells a
/// certificate resolver nothing of the versions a client offers. So the ClientHello is read
/// before the handshake (then put back): a client that does not offer TLS 1.3 in its
/// `supported_versions` gets a `protocol_version` alert and the connection is closed.
/// Every TLS listener has it: it also registers the socket with the event loop of the thread
/// that runs the handshake (`conn::rehome_before_tls`).
pub struct VersionGate {
    pub resolver: Arc<Resolver>,
}

/// Longest wait for a client's ClientHello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

#[async_trait::async_trait]
impl pingora::listeners::PreTlsProcess for VersionGate {
    async fn process(
        &self,
        stream: &mut pingora::protocols::l4::stream::Stream,
    ) -> pingora::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        crate::conn::rehome_before_tls(stream);
        if !self.resolver.tls13_only.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut head = [0u8; 5];
        let read = async {
            stream.read_exact(&mut head).await?;
            let len = usize::from(u16::from_be_bytes([head[3], head[4]]));
            let mut body = vec![0u8; len];
            stream.read_exact(&mut body).await?;
            Ok::<_, std::io::Error>(body)
        };
        let body = match tokio::time::timeout(HELLO_TIMEOUT, read).await {
            Ok(Ok(b)) => b,
            _ => {
                return pingora::Error::e_explain(
                    pingora::ErrorType::HandshakeError,
                    "no ClientHello",
                )
            }
        };
        let offers_13 = head[0] != 0x16 || offers_tls13(&body) != Some(false);
        let mut all = head.to_vec();
        all.extend_from_slice(&body);
        stream.rewind(&all);
        if offers_13 {
            return Ok(());
        }
        // A fatal protocol_version alert, in the record version the client used.
        let alert = [0x15, head[1], head[2], 0x00, 0x02, 0x02, 0x46];
        let _ = stream.write_all(&alert).await;
        let _ = stream.flush().await;
        pingora::Error::e_explain(
            pingora::ErrorType::HandshakeError,
            "client does not offer TLS 1.3 (min_version = \"1.3\")",
        )
    }
}

/// Whether a ClientHello (the body of its first handshake record) offers TLS 1.3 in
/// `supported_versions`; `None` when it cannot be read from this record (then rustls
/// decides).
pub fn offers_tls13(record: &[u8]) -> Option<bool> {
    let take = |at: usize, n: usize| record.get(at..at.checked_add(n)?);
    let u8_at = |at: usize| record.get(at).copied().map(usize::from);
    let u16_at = |at: usize| take(at, 2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])));
    if record.first() != Some(&1) {
        return None;
    }
    // type(1) length(3) version(2) random(32)
    let mut at = 4 + 2 + 32;
    at += 1 + u8_at(at)?; // session id
    at += 2 + u16_at(at)?; // cipher suites
    at += 1 + u8_at(at)?; // compression methods
    if at == record.len() {
        return Some(false); // no extensions: TLS 1.2 or older
    }
    let end = at + 2 + u16_at(at)?;
    at += 2;
    while at + 4 <= end {
        let (kind, len) = (u16_at(at)?, u16_at(at + 2)?);
        let data = take(at + 4, len)?;
        if kind == 0x002b {
            let list = data.get(1..1 + usize::from(*data.first()?))?;
            return Some(list.chunks_exact(2).any(|v| v == [0x03, 0x04]));
        }
        at += 4 + len;
    }
    if end > record.len() {
        None
    } else {
        Some(false)
    }
}

/// The rustls verifier for `[tls] client_ca`: a client certificate is asked for, not
/// required (classes decide); one that is presented must chain to the CA.
pub fn client_verifier(
    roots: Arc<RootCertStore>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, String> {
    WebPkiClientVerifier::builder_with_provider(
        roots,
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| format!("client_ca: {e}"))
}

/// Size and modification time of each certificate and key file: a change of any means the
/// files were renewed (also when a symlink was swapped, as cert-manager and ConfigMaps do).
fn fingerprint(files: &[(PathBuf, PathBuf)]) -> Vec<Option<(u64, SystemTime)>> {
    files
        .iter()
        .flat_map(|(c, k)| [c, k])
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH)))
        })
        .collect()
}

/// How often certificate files are looked at.
const CERT_POLL: Duration = Duration::from_millis(500);

/// Watches the certificate files of the current config (`files` gives them) and loads the
/// set again when any changes. A file that does not load keeps the old certificates serving;
/// the reason goes to the log and counts as a failure.
pub fn spawn_cert_watch(
    resolver: Arc<Resolver>,
    files: impl Fn() -> Vec<(PathBuf, PathBuf)> + Send + 'static,
) -> std::io::Result<()> {
    let count = |result: &str| {
        if let Some(m) = crate::metrics::get() {
            m.cert_reloads.with_label_values(&[result]).inc();
        }
    };
    std::thread::Builder::new()
        .name("erpgate-certs".into())
        .spawn(move || {
            let mut last_files = files();
            let mut last = fingerprint(&last_files);
            loop {
                std::thread::sleep(CERT_POLL);
                let now_files = files();
                let now = fingerprint(&now_files);
                if now_files != last_files {
                    // A config reload brought other files: it loaded them itself.
                    last_files = now_files;
                    last = now;
                    continue;
                }
                if now == last {
                    continue;
                }
                // Let a renewal that writes two files finish writing both.
                std::thread::sleep(CERT_POLL);
                last = fingerprint(&now_files);
                match now_files
                    .iter()
                    .map(|(c, k)| load_pair(c, k))
                    .collect::<Result<Vec<_>, _>>()
                {
                    Ok(loaded) => {
                        resolver.set.store(Arc::new(CertSet::new(loaded)));
                        count("ok");
                        tracing::info!("TLS certificates reloaded");
                    }
                    Err(e) => {
                        count("error");
                        tracing::error!(
                            "TLS certificate reload failed, the old certificates keep serving: {e}"
                        );
                    }
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certs_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("certs")
    }

    fn pair(name: &str) -> Loaded {
        let d = certs_dir();
        load_pair(
            &d.join(format!("{name}.crt")),
            &d.join(format!("{name}.key")),
        )
        .expect("test certificate")
    }

    #[test]
    fn certificates_are_picked_by_sni_exact_then_wildcard_then_the_first() {
        let set = CertSet::new(vec![pair("localhost"), pair("erp-test"), pair("wild-test")]);
        let pick = |sni: Option<&str>| {
            set.pick(sni).map(|l| {
                l.cert_path
                    .file_name()
                    .expect("name")
                    .to_string_lossy()
                    .into_owned()
            })
        };
        assert_eq!(pick(Some("erp.test")).as_deref(), Some("erp-test.crt"));
        assert_eq!(pick(Some("ERP.test.")).as_deref(), Some("erp-test.crt"));
        assert_eq!(pick(Some("a.wild.test")).as_deref(), Some("wild-test.crt"));
        // A wildcard covers one label only.
        assert_eq!(
            pick(Some("a.b.wild.test")).as_deref(),
            Some("localhost.crt")
        );
        assert_eq!(pick(Some("wild.test")).as_deref(), Some("localhost.crt"));
        assert_eq!(pick(None).as_deref(), Some("localhost.crt"));
        assert!(CertSet::new(vec![]).pick(None).is_none());
    }

    /// The first record a rustls client sends (its ClientHello), without the record header.
    fn client_hello(versions: &[&'static rustls::SupportedProtocolVersion]) -> Vec<u8> {
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from("erp.test").expect("name");
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).expect("client");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("hello");
        assert_eq!(out[0], 0x16);
        out[5..].to_vec()
    }

    #[test]
    fn a_client_hello_tells_whether_tls13_is_offered() {
        use rustls::version::{TLS12, TLS13};
        assert_eq!(offers_tls13(&client_hello(&[&TLS12, &TLS13])), Some(true));
        assert_eq!(offers_tls13(&client_hello(&[&TLS13])), Some(true));
        assert_eq!(offers_tls13(&client_hello(&[&TLS12])), Some(false));
        // Truncated or foreign bytes: undecided, never a panic.
        let full = client_hello(&[&TLS12, &TLS13]);
        for n in 0..full.len() {
            let _ = offers_tls13(&full[..n]);
        }
        assert_eq!(offers_tls13(&full[..40]), None);
        assert_eq!(offers_tls13(b"GET / HTTP/1.1"), None);
    }

    #[test]
    fn names_and_expiry_are_read_and_mismatched_keys_refused() {
        let l = pair("localhost");
        assert_eq!(l.names, vec!["localhost".to_string()]);
        assert!(l.not_after > 2_000_000_000, "{}", l.not_after);
        let d = certs_dir();
        let err =
            load_pair(&d.join("erp-test.crt"), &d.join("localhost.key")).expect_err("mismatch");
        assert!(err.contains("is not the key of"), "{err}");
        let err = load_pair(&d.join("nope.crt"), &d.join("localhost.key")).expect_err("missing");
        assert!(err.contains("cannot read certificate"), "{err}");
        let err =
            load_pair(&d.join("localhost.key"), &d.join("localhost.key")).expect_err("no cert");
        assert!(err.contains("no certificate"), "{err}");
        assert!(load_roots(&d.join("ca.crt")).is_ok());
        assert!(load_roots(&d.join("localhost.key")).is_err());
    }
}
