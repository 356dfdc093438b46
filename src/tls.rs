//! TLS termination and re-encryption settings, built with rustls on the
//! control plane (when the config is read, so a certificate or key that
//! cannot be loaded fails the start or the reload, and a reload that fails
//! keeps the certificates in force).
//!
//! The crypto provider is aws-lc-rs: its P-256 signing (what a full
//! ECDSA handshake costs the server) is the fastest of rustls' providers;
//! `handshake_cost` in tests/tls.rs measures it here.
//!
//! Session resumption: tickets from a rotating key (a new key every 6
//! hours, the previous one still accepted) and a server-side session cache,
//! both kept per frontend across reloads, so a reload does not turn every
//! returning client into a full handshake.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ProducesTickets, ResolvesServerCert, StoresServerSessions};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::hello::Router;

/// Server-side sessions kept per frontend by default (TLS 1.2 session
/// ids, and TLS 1.3 stateful resumption when tickets are off): HAProxy's
/// default `tune.ssl.cachesize` is 20,000.
pub const DEFAULT_SESSION_CACHE: usize = 20_000;

/// What `tls = { ... }` of a frontend says, as read from the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerOptions {
    /// Certificate chain and key files; the first is the default, the
    /// others are chosen by the names their certificates hold.
    pub certs: Vec<(PathBuf, PathBuf)>,
    /// `"1.2"` (the default: 1.2 and 1.3) or `"1.3"`.
    pub min_version: Version,
    /// Offered ALPN protocols, in the server's order of preference.
    pub alpn: Vec<String>,
    /// Client certificates are required and verified against these CAs.
    pub client_ca: Option<PathBuf>,
    pub handshake_timeout: Duration,
    /// Stateless resumption with tickets (HAProxy: on unless `no-tls-tickets`).
    pub tickets: bool,
    /// Sessions kept for stateful resumption; 0 keeps none. With tickets
    /// off too, every handshake is a full one.
    pub session_cache: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Tls12,
    Tls13,
}

/// A frontend's TLS server, ready for connections.
#[derive(Clone)]
pub struct TlsServer {
    pub config: Arc<ServerConfig>,
    pub options: ServerOptions,
}

impl PartialEq for TlsServer {
    /// Two loads of the same files are two servers: a reload re-reads them.
    fn eq(&self, other: &TlsServer) -> bool {
        Arc::ptr_eq(&self.config, &other.config)
    }
}

impl Eq for TlsServer {}

impl fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsServer({:?})", self.options)
    }
}

/// The TLS client of `backend-tls = true`.
#[derive(Clone)]
pub struct TlsClient {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
    pub ca: Option<PathBuf>,
}

impl PartialEq for TlsClient {
    fn eq(&self, other: &TlsClient) -> bool {
        Arc::ptr_eq(&self.config, &other.config)
    }
}

impl Eq for TlsClient {}

impl fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsClient({:?}, {:?})", self.server_name, self.ca)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Loads a certificate chain and its key; says which file is wrong.
fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect())
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in it", cert.display()));
    }
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    CertifiedKey::from_der(chain, key_der, &provider())
        .map_err(|e| format!("{} with {}: {e}", cert.display(), key.display()))
}

/// The DNS names a certificate is valid for (its subjectAltNames).
fn names_of(key: &CertifiedKey) -> Vec<String> {
    let Ok(der) = key.end_entity_cert() else {
        return Vec::new();
    };
    match webpki::EndEntityCert::try_from(der) {
        Ok(cert) => cert
            .valid_dns_names()
            .map(str::to_ascii_lowercase)
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Whether a certificate is outside its validity period now: a warning at
/// load, since clients will refuse it.
fn expired(key: &CertifiedKey) -> Option<String> {
    let der = key.end_entity_cert().ok()?;
    let cert = webpki::EndEntityCert::try_from(der).ok()?;
    // Validity is checked on the end-entity certificate before its issuer
    // is looked for, so trusting the certificate itself tells expiry apart.
    let anchor = webpki::anchor_from_trusted_cert(der).ok()?;
    let algs = provider().signature_verification_algorithms;
    let anchors = [anchor];
    let result = cert.verify_for_usage(
        algs.all,
        &anchors,
        &[],
        UnixTime::now(),
        webpki::KeyUsage::server_auth(),
        None,
        None,
    );
    match result {
        Err(webpki::Error::CertExpired { .. }) => Some("has expired".into()),
        Err(webpki::Error::CertNotValidYet { .. }) => Some("is not valid yet".into()),
        _ => None,
    }
}

/// Certificates by the server name a client asks for; the first one for
/// names none of them holds (and for clients without SNI).
#[derive(Debug)]
struct CertResolver {
    keys: Vec<Arc<CertifiedKey>>,
    names: Router,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = hello.server_name().and_then(|n| self.names.route(n));
        self.keys.get(chosen.unwrap_or(0)).cloned()
    }
}

/// What a frontend's resumption state is kept under across reloads: its
/// name, who may resume (a session made without a client certificate
/// must not resume where one is required) and the cache's size.
type ResumptionKey = (String, Option<PathBuf>, usize);

#[derive(Clone)]
struct Resumption {
    tickets: Arc<dyn ProducesTickets>,
    cache: Arc<dyn StoresServerSessions>,
}

fn resumption(key: ResumptionKey) -> Result<Resumption, String> {
    static KEPT: OnceLock<Mutex<HashMap<ResumptionKey, Resumption>>> = OnceLock::new();
    let kept = KEPT.get_or_init(Mutex::default);
    let mut kept = kept
        .lock()
        .map_err(|_| "session state lock poisoned".to_string())?;
    if let Some(r) = kept.get(&key) {
        return Ok(r.clone());
    }
    let tickets =
        rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| format!("session tickets: {e}"))?;
    let cache: Arc<dyn StoresServerSessions> = match key.2 {
        0 => Arc::new(rustls::server::NoServerSessionStorage {}),
        size => rustls::server::ServerSessionMemoryCache::new(size),
    };
    let made = Resumption { tickets, cache };
    kept.insert(key, made.clone());
    Ok(made)
}

static TLS13_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];

fn versions(min: Version) -> &'static [&'static rustls::SupportedProtocolVersion] {
    match min {
        Version::Tls12 => rustls::ALL_VERSIONS,
        Version::Tls13 => &TLS13_ONLY,
    }
}

fn roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "{}: no usable CA certificate in it",
            path.display()
        ));
    }
    Ok(roots)
}

/// Builds a frontend's TLS server; warnings (an expired certificate) go
/// to the log. `frontend` keys its resumption state.
pub fn server(frontend: &str, options: &ServerOptions) -> Result<TlsServer, String> {
    let mut keys = Vec::with_capacity(options.certs.len());
    let mut names = Vec::with_capacity(options.certs.len());
    for (cert, key) in &options.certs {
        let certified = certified_key(cert, key)?;
        if let Some(why) = expired(&certified) {
            log::warn!(
                "frontend {frontend}: certificate {} {why}: clients will refuse it",
                cert.display()
            );
        }
        names.push(names_of(&certified));
        keys.push(Arc::new(certified));
    }
    let resolver = CertResolver {
        keys,
        names: Router::new(names.iter().map(Vec::as_slice)),
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(options.min_version))
        .map_err(|e| format!("tls: {e}"))?;
    let builder = match &options.client_ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)?),
                provider(),
            )
            .build()
            .map_err(|e| format!("client-ca {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = options.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let kept = resumption((
        frontend.to_string(),
        options.client_ca.clone(),
        options.session_cache,
    ))?;
    // Without a ticketer rustls keeps its default, which issues none.
    if options.tickets {
        config.ticketer = kept.tickets;
    }
    config.session_storage = kept.cache;
    // TLS 1.3 tickets: two per handshake is rustls' default; one is enough
    // for a client that reconnects once at a time, and each costs a record.
    let resumable = options.tickets || options.session_cache > 0;
    config.send_tls13_tickets = usize::from(resumable);
    Ok(TlsServer {
        config: Arc::new(config),
        options: options.clone(),
    })
}

/// The client for `backend-tls`: verifies the backend's certificate
/// against `ca` (or the system's roots) for `server_name`.
pub fn client(ca: Option<&Path>, server_name: &str) -> Result<TlsClient, String> {
    let roots = match ca {
        Some(path) => roots(path)?,
        None => system_roots()?,
    };
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| format!("backend-server-name {server_name}: {e}"))?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("backend-tls: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsClient {
        config: Arc::new(config),
        server_name: name,
        ca: ca.map(Path::to_path_buf),
    })
}

/// Debian's CA bundle (ca-certificates).
fn system_roots() -> Result<RootCertStore, String> {
    let bundle = Path::new("/etc/ssl/certs/ca-certificates.crt");
    roots(bundle).map_err(|e| format!("backend-tls without backend-ca uses the system roots: {e}"))
}

/// Why a handshake failed; also the `reason` label of its metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Not done within the handshake timeout.
    Timeout,
    /// The client closed or reset before the handshake completed.
    Closed,
    /// A client certificate was missing or refused.
    ClientCert,
    /// No protocol version, cipher suite or ALPN protocol in common.
    Negotiation,
    /// Anything else: malformed messages, bad records, alerts.
    Protocol,
}

impl Failure {
    pub const ALL: [Failure; 5] = [
        Failure::Timeout,
        Failure::Closed,
        Failure::ClientCert,
        Failure::Negotiation,
        Failure::Protocol,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Closed => "closed",
            Failure::ClientCert => "client-cert",
            Failure::Negotiation => "negotiation",
            Failure::Protocol => "protocol",
        }
    }

    pub fn of(error: &rustls::Error) -> Failure {
        use rustls::Error as E;
        match error {
            E::NoCertificatesPresented | E::InvalidCertificate(_) => Failure::ClientCert,
            E::PeerIncompatible(_) | E::NoApplicationProtocol => Failure::Negotiation,
            E::AlertReceived(rustls::AlertDescription::CertificateRequired) => Failure::ClientCert,
            _ => Failure::Protocol,
        }
    }
}
