//! TLS on every link, with rustls (ring).
//!
//! - The client ports (`--tls-cert`, `--tls-key`): the coordinator's gRPC and HTTP API; clients
//!   trust a CA of their own (`shardctl --tls-ca`).
//! - The cluster's own links (`--cluster-ca`, `--cluster-cert`, `--cluster-key`, and
//!   `--cluster-crl` for revoked certificates): coordinator to worker, worker to worker (step
//!   streams and tensor-parallel links), worker to the coordinator's embedded membership. Both
//!   ends present a certificate of the cluster CA, and a peer without one is refused in the
//!   handshake, before any message is read.
//!
//! Certificates, keys, the CA and the CRL are read again whenever their files change
//! (cert-manager rotates them). Each handshake runs on a task of its own, bounded, and a
//! refused one is logged with why while everyone else is served.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How long a peer may take to complete its handshake.
pub const HANDSHAKE: Duration = Duration::from_secs(10);

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate, key, CA or CRL file could not be read or holds nothing usable.
    #[error("{flag} {}: {message}", path.display())]
    File { flag: &'static str, path: PathBuf, message: String },
    /// rustls refused the configuration (a key that does not match its certificate, say).
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// The CA or CRL could not make a verifier.
    #[error("TLS: {0}")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
}

fn file_error(flag: &'static str, path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File { flag, path: path.to_path_buf(), message: message.to_string() }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// When files last changed, as far as reloading cares.
type Stamp = Vec<(Option<SystemTime>, u64)>;

fn stamp(paths: &[&Path]) -> Stamp {
    paths.iter().map(|p| std::fs::metadata(p).map(|m| (m.modified().ok(), m.len())).unwrap_or((None, 0))).collect()
}

/// A value read from files, read again when one of them changes; kept as it was when the new
/// files do not load (a rotation caught half-written), with a log line.
struct Reloading<T> {
    paths: Vec<PathBuf>,
    what: &'static str,
    load: Box<dyn Fn() -> Result<T, TlsError> + Send + Sync>,
    current: RwLock<(Stamp, T)>,
}

impl<T: Clone> Reloading<T> {
    fn open(
        paths: Vec<PathBuf>,
        what: &'static str,
        load: impl Fn() -> Result<T, TlsError> + Send + Sync + 'static,
    ) -> Result<Self, TlsError> {
        let s = stamp(&paths.iter().map(PathBuf::as_path).collect::<Vec<_>>());
        let first = load()?;
        Ok(Reloading { paths, what, load: Box::new(load), current: RwLock::new((s, first)) })
    }

    fn get(&self) -> T {
        let now = stamp(&self.paths.iter().map(PathBuf::as_path).collect::<Vec<_>>());
        {
            let cur = self.current.read().unwrap_or_else(|e| e.into_inner());
            if cur.0 == now {
                return cur.1.clone();
            }
        }
        let mut cur = self.current.write().unwrap_or_else(|e| e.into_inner());
        match (self.load)() {
            Ok(v) => {
                info!(file = %self.paths[0].display(), "{} read again", self.what);
                *cur = (now, v);
            }
            Err(e) => {
                warn!(file = %self.paths[0].display(), error = %e, "the changed {} does not load; keeping the previous one", self.what);
                // Not tried again until the files change once more.
                cur.0 = now;
            }
        }
        cur.1.clone()
    }
}

/// A certificate chain and key from PEM files, read again when either changes; presented by a
/// server, or by a client that is asked for a certificate.
pub struct CertFiles {
    inner: Reloading<Arc<CertifiedKey>>,
}

impl std::fmt::Debug for CertFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CertFiles({})", self.inner.paths[0].display())
    }
}

impl CertFiles {
    /// Reads the files once (a bad pair fails at start); `flags` name them in errors, e.g.
    /// `("--tls-cert", "--tls-key")`.
    pub fn open(cert: &Path, key: &Path, flags: (&'static str, &'static str)) -> Result<Arc<Self>, TlsError> {
        let (c, k) = (cert.to_path_buf(), key.to_path_buf());
        let inner = Reloading::open(vec![c.clone(), k.clone()], "TLS certificate", move || load_pair(&c, &k, flags).map(Arc::new))?;
        Ok(Arc::new(CertFiles { inner }))
    }

    fn get(&self) -> Arc<CertifiedKey> {
        self.inner.get()
    }
}

fn load_pair(cert: &Path, key: &Path, (cert_flag, key_flag): (&'static str, &'static str)) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(cert).and_then(|i| i.collect()).map_err(|e| file_error(cert_flag, cert, e))?;
    if chain.is_empty() {
        return Err(file_error(cert_flag, cert, "no certificate in it"));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error(key_flag, key, e))?;
    Ok(CertifiedKey::from_der(chain, key, &provider())?)
}

impl ResolvesServerCert for CertFiles {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

impl ResolvesClientCert for CertFiles {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A server config presenting `files`, asking no certificate of clients, offering `alpn`
/// (`h2` for gRPC, `http/1.1` for HTTP): a client port.
pub fn server_config(files: Arc<CertFiles>, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(files);
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

fn read_roots(flag: &'static str, ca: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| file_error(flag, ca, e))? {
        roots.add(cert.map_err(|e| file_error(flag, ca, e))?).map_err(|e| file_error(flag, ca, e))?;
    }
    if roots.is_empty() {
        return Err(file_error(flag, ca, "no certificate in it"));
    }
    Ok(roots)
}

/// A client config trusting the certificates of `ca` (PEM), offering `h2`: what `shardctl
/// --tls-ca` uses.
pub fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(read_roots("--tls-ca", ca)?)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Whether a server of the cluster insists on a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// No certificate, no connection: workers' ports and tensor-parallel links.
    Required,
    /// A certificate, when presented, must be the cluster's; clients without one go on (the
    /// coordinator's port, which serves clients and the embedded membership alike; the
    /// membership service itself then asks for a cluster peer).
    Optional,
}

/// The verifiers made from the cluster CA and CRL.
#[derive(Clone)]
struct Trust {
    required: Arc<dyn ClientCertVerifier>,
    optional: Arc<dyn ClientCertVerifier>,
    server: Arc<dyn ServerCertVerifier>,
}

/// The cluster's identity: its CA (and CRL) and this process's certificate, presented on every
/// link inside the cluster and asked of every peer.
pub struct ClusterTls {
    files: Arc<CertFiles>,
    trust: Reloading<Trust>,
}

impl std::fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterTls(ca {}, {:?})", self.trust.paths[0].display(), self.files)
    }
}

fn load_trust(ca: &Path, crl: Option<&Path>) -> Result<Trust, TlsError> {
    let roots = Arc::new(read_roots("--cluster-ca", ca)?);
    let crls: Vec<CertificateRevocationListDer<'static>> = match crl {
        Some(p) => {
            CertificateRevocationListDer::pem_file_iter(p).and_then(|i| i.collect()).map_err(|e| file_error("--cluster-crl", p, e))?
        }
        None => Vec::new(),
    };
    let client = || {
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider()).with_crls(crls.clone()).only_check_end_entity_revocation()
    };
    let server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
        .with_crls(crls.clone())
        .only_check_end_entity_revocation()
        .build()?;
    Ok(Trust {
        required: client().build()?,
        optional: client().allow_unauthenticated().build()?,
        server: Arc::new(AnyNameOfTheCluster(server)),
    })
}

/// Checks a server's certificate as webpki does (the cluster CA's signature, validity,
/// purpose, revocation), except its name: inside the cluster the CA is the identity, and
/// workers are reached at whatever address they advertise (a pod's IP, a container's
/// generated host name), which no certificate made ahead of time can list.
#[derive(Debug)]
struct AnyNameOfTheCluster(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyNameOfTheCluster {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        // webpki checks the name last, after the chain, validity and revocation passed.
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(NotValidForName | NotValidForNameContext { .. })) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

impl ClusterTls {
    /// Reads the CA, this process's certificate and key, and the CRL when given; each is read
    /// again when it changes.
    pub fn open(ca: &Path, cert: &Path, key: &Path, crl: Option<&Path>) -> Result<Arc<Self>, TlsError> {
        let files = CertFiles::open(cert, key, ("--cluster-cert", "--cluster-key"))?;
        let mut paths = vec![ca.to_path_buf()];
        paths.extend(crl.map(Path::to_path_buf));
        let (ca_path, crl_path) = (ca.to_path_buf(), crl.map(Path::to_path_buf));
        let trust = Reloading::open(paths, "cluster CA", move || load_trust(&ca_path, crl_path.as_deref()))?;
        Ok(Arc::new(ClusterTls { files, trust }))
    }

    /// A server config for a cluster port: presents `cert` (this process's cluster
    /// certificate when `None`), checks client certificates against the cluster CA.
    pub fn server_config(
        &self,
        cert: Option<Arc<CertFiles>>,
        alpn: &[&[u8]],
        auth: ClientAuth,
    ) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let trust = self.trust.get();
        let verifier = match auth {
            ClientAuth::Required => trust.required,
            ClientAuth::Optional => trust.optional,
        };
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(cert.unwrap_or_else(|| self.files.clone()));
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        // Links are long-lived; tickets would only be more bytes on a link that is not a
        // byte stream of frames yet (the tensor-parallel one reads them in its own order).
        cfg.send_tls13_tickets = 0;
        Ok(Arc::new(cfg))
    }

    /// A client config for a cluster link: trusts the cluster CA, presents this process's
    /// cluster certificate.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(self.trust.get().server)
            .with_client_cert_resolver(self.files.clone());
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        cfg.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(cfg))
    }

    /// The server side of a blocking link (tensor-parallel): the handshake, bounded by the
    /// socket's timeouts, requiring a cluster certificate.
    pub fn accept_blocking(
        &self,
        mut tcp: std::net::TcpStream,
    ) -> Result<rustls::StreamOwned<rustls::ServerConnection, std::net::TcpStream>, std::io::Error> {
        let cfg = self.server_config(None, &[], ClientAuth::Required).map_err(std::io::Error::other)?;
        let mut conn = rustls::ServerConnection::new(cfg).map_err(std::io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)?;
        }
        Ok(rustls::StreamOwned::new(conn, tcp))
    }

    /// The client side of a blocking link to `host`.
    pub fn connect_blocking(
        &self,
        mut tcp: std::net::TcpStream,
        host: &str,
    ) -> Result<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>, std::io::Error> {
        let cfg = self.client_config(&[]).map_err(std::io::Error::other)?;
        let name = ServerName::try_from(host.trim_matches(|c| c == '[' || c == ']').to_string()).map_err(std::io::Error::other)?;
        let mut conn = rustls::ClientConnection::new(cfg, name).map_err(std::io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)?;
        }
        Ok(rustls::StreamOwned::new(conn, tcp))
    }
}

/// Who is on the other end of an accepted TLS connection: what a service sees of it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: std::net::SocketAddr,
    /// The peer presented a certificate the server's verifier accepted (only cluster ports
    /// ask for one).
    pub certified: bool,
}

/// One accepted TLS connection.
#[derive(Debug)]
pub struct TlsConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    peer: std::net::SocketAddr,
}

impl AsyncRead for TlsConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Peer {
        let certified = self.stream.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
        Peer { addr: self.peer, certified }
    }
}

/// Accepts on `listener` until `shutdown`, handshaking each connection on a task of its own
/// with the config `config` gives at that moment (so a rotated CA or CRL applies to the next
/// connection); the connections that complete come out of the receiver. `port` names the
/// port in log lines.
pub fn accept<F>(listener: TcpListener, config: F, port: &'static str, shutdown: CancellationToken) -> mpsc::Receiver<TlsConn>
where
    F: Fn() -> Result<Arc<rustls::ServerConfig>, TlsError> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(port, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = match config() {
                Ok(c) => tokio_rustls::TlsAcceptor::from(c),
                Err(e) => {
                    warn!(port, %peer, error = %e, "TLS handshake refused: no usable configuration");
                    continue;
                }
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(TlsConn { stream, peer }).await;
                    }
                    Ok(Err(e)) => warn!(port, %peer, error = %e, "TLS handshake refused"),
                    Err(_) => warn!(port, %peer, "TLS handshake refused: not completed within 10 s"),
                }
            });
        }
    });
    rx
}

/// A TLS listener for axum (the HTTP API).
pub struct TlsListener {
    pub rx: mpsc::Receiver<TlsConn>,
    pub addr: std::net::SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsConn;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (TlsConn, std::net::SocketAddr) {
        match self.rx.recv().await {
            Some(c) => {
                let peer = c.peer;
                (c, peer)
            }
            // Shutting down: the server stops on its own signal.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        Ok(self.addr)
    }
}

/// What tonic connects through to reach `http://HOST:PORT` over TLS with `cfg`: TCP (no
/// Nagle delay), then the handshake, both within [`HANDSHAKE`]; HOST is the name the server's
/// certificate is checked against (where the verifier checks names).
pub fn connector(
    cfg: Arc<rustls::ClientConfig>,
) -> impl tower::Service<
    http::Uri,
    Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
       + Send {
    tower::service_fn(move |uri: http::Uri| {
        let cfg = cfg.clone();
        async move {
            let host = uri.host().ok_or_else(|| std::io::Error::other(format!("{uri}: no host")))?;
            let host = host.trim_matches(|c| c == '[' || c == ']').to_string();
            let port = uri.port_u16().unwrap_or(443);
            let connect = async {
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                let name = ServerName::try_from(host.clone()).map_err(std::io::Error::other)?;
                let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            };
            tokio::time::timeout(HANDSHAKE, connect)
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS connection not made within 10 s"))?
        }
    })
}

/// `https://HOST:PORT` (or `HOST:PORT`) as the `http://` URL tonic is given when TLS is done
/// by [`connector`].
pub fn plain_url(url: &str) -> String {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://")).unwrap_or(url);
    format!("http://{rest}")
}

/// An error with its causes, `: `-separated (tonic's transport errors say little on top).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The cluster's TLS flags, declared once for the coordinator, the worker and `shardctl up`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClusterTlsArgs {
    /// The cluster CA (PEM): every link inside the cluster (coordinator to worker, worker to
    /// worker, tensor-parallel links, the embedded membership) is mutual TLS, both ends
    /// presenting a certificate it signed. Needs --cluster-cert and --cluster-key.
    #[arg(long, env = "SHARDSERVE_CLUSTER_CA", requires_all = ["cluster_cert", "cluster_key"])]
    pub cluster_ca: Option<PathBuf>,
    /// This process's certificate (PEM) for links inside the cluster; it must allow both
    /// server and client authentication (`node.pem` of `shardctl dev certs`).
    #[arg(long, env = "SHARDSERVE_CLUSTER_CERT", requires = "cluster_ca")]
    pub cluster_cert: Option<PathBuf>,
    /// The private key (PEM) of --cluster-cert.
    #[arg(long, env = "SHARDSERVE_CLUSTER_KEY", requires = "cluster_ca")]
    pub cluster_key: Option<PathBuf>,
    /// Revoked cluster certificates (a PEM CRL of the cluster CA), refused on every link; read
    /// again whenever it changes.
    #[arg(long, env = "SHARDSERVE_CLUSTER_CRL", requires = "cluster_ca")]
    pub cluster_crl: Option<PathBuf>,
}

impl ClusterTlsArgs {
    /// The cluster identity, when asked for.
    pub fn open(&self) -> Result<Option<Arc<ClusterTls>>, TlsError> {
        match (&self.cluster_ca, &self.cluster_cert, &self.cluster_key) {
            (Some(ca), Some(cert), Some(key)) => ClusterTls::open(ca, cert, key, self.cluster_crl.as_deref()).map(Some),
            _ => Ok(None),
        }
    }

    /// The same flags as arguments, for processes `shardctl up` starts.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        for (flag, v) in [
            ("--cluster-ca", &self.cluster_ca),
            ("--cluster-cert", &self.cluster_cert),
            ("--cluster-key", &self.cluster_key),
            ("--cluster-crl", &self.cluster_crl),
        ] {
            if let Some(p) = v {
                a.extend([flag.to_string(), p.display().to_string()]);
            }
        }
        a
    }
}

#[cfg(test)]
mod tests;
