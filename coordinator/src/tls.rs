//! TLS on the coordinator's client ports (`--tls-cert`, `--tls-key`), with rustls (ring): the
//! certificate and key are read again whenever their files change (cert-manager rotates them),
//! each handshake runs on a task of its own (bounded), and a refused one — plaintext, a client
//! that does not trust the certificate — is logged with why while everyone else is served.
//! Also the client side `shardctl` uses (`--tls-ca`).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
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

/// How long a client may take to complete its handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// When a file last changed, as far as reloading cares.
type Stamp = Vec<(Option<SystemTime>, u64)>;

fn stamp(paths: &[&Path]) -> Stamp {
    paths.iter().map(|p| std::fs::metadata(p).map(|m| (m.modified().ok(), m.len())).unwrap_or((None, 0))).collect()
}

/// A certificate chain and key from PEM files, read again when either changes.
pub struct CertFiles {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<(Stamp, Arc<CertifiedKey>)>,
}

impl std::fmt::Debug for CertFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CertFiles({}, {})", self.cert.display(), self.key.display())
    }
}

impl CertFiles {
    /// Reads the files once: a bad pair fails at start.
    pub fn open(cert: &Path, key: &Path) -> anyhow::Result<Arc<Self>> {
        let s = stamp(&[cert, key]);
        let loaded = load(cert, key)?;
        Ok(Arc::new(CertFiles { cert: cert.to_path_buf(), key: key.to_path_buf(), current: RwLock::new((s, Arc::new(loaded))) }))
    }

    /// The pair to present: read again when the files changed; kept as it was when the new
    /// files do not load (a rotation caught half-written), with a log line.
    fn get(&self) -> Arc<CertifiedKey> {
        let now = stamp(&[&self.cert, &self.key]);
        {
            let cur = self.current.read().unwrap_or_else(|e| e.into_inner());
            if cur.0 == now {
                return cur.1.clone();
            }
        }
        let mut cur = self.current.write().unwrap_or_else(|e| e.into_inner());
        match load(&self.cert, &self.key) {
            Ok(k) => {
                info!(cert = %self.cert.display(), "TLS certificate read again");
                *cur = (now, Arc::new(k));
            }
            Err(e) => warn!(cert = %self.cert.display(), error = %e, "the changed TLS certificate does not load; keeping the previous one"),
        }
        cur.1.clone()
    }
}

fn load(cert: &Path, key: &Path) -> anyhow::Result<CertifiedKey> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect())
        .map_err(|e| anyhow::anyhow!("--tls-cert {}: {e}", cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "--tls-cert {}: no certificate in it", cert.display());
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| anyhow::anyhow!("--tls-key {}: {e}", key.display()))?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| anyhow::anyhow!("--tls-cert/--tls-key: {e}"))
}

impl ResolvesServerCert for CertFiles {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// A server config presenting `files`, offering `alpn` (`h2` for gRPC, `http/1.1` for HTTP).
pub fn acceptor(files: Arc<CertFiles>, alpn: &[&[u8]]) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(files);
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
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
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.get_ref().0.connect_info()
    }
}

/// Accepts on `listener` until `shutdown`, handshaking each connection on a task of its own;
/// the connections that complete come out of the receiver.
pub fn accept(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor, port: &'static str, shutdown: CancellationToken) -> mpsc::Receiver<TlsConn> {
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
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
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

/// The HTTP API's listener over TLS.
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

/// A client config trusting the certificates of `ca` (PEM), offering `h2`.
pub fn client_config(ca: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| anyhow::anyhow!("--tls-ca {}: {e}", ca.display()))? {
        roots.add(cert.map_err(|e| anyhow::anyhow!("--tls-ca {}: {e}", ca.display()))?)?;
    }
    anyhow::ensure!(!roots.is_empty(), "--tls-ca {}: no certificate in it", ca.display());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// A gRPC channel to `url` (`https://HOST:PORT`) over TLS, trusting `cfg`'s roots and checking
/// the certificate is for HOST.
pub async fn connect(url: &str, cfg: Arc<rustls::ClientConfig>) -> anyhow::Result<tonic::transport::Channel> {
    let uri: http::Uri = url.parse().map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    let host = uri.host().ok_or_else(|| anyhow::anyhow!("{url}: no host"))?.trim_matches(|c| c == '[' || c == ']').to_string();
    let port = uri.port_u16().unwrap_or(443);
    // tonic speaks plain HTTP/2 to what the connector gives it: the TLS is done here.
    let plain = format!("http://{}:{port}", uri.host().unwrap_or_default());
    let connector = tower::service_fn(move |_: http::Uri| {
        let (cfg, host) = (cfg.clone(), host.clone());
        async move {
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(host).map_err(std::io::Error::other)?;
            let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    tonic::transport::Endpoint::from_shared(plain)?
        .connect_with_connector(connector)
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the coordinator at {url} over TLS: {}", error_chain(&e)))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
