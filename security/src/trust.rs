//! The live trust of a node (or of the CLI): TLS configurations built from
//! its [`NodeTls`], swapped whole when the certificate is renewed or the CA
//! bundle changes, and the revocation list every check consults.
//!
//! - **Servers** accept connections through [`Trust::incoming`]: each
//!   handshake uses the configuration current at that moment, so a renewed
//!   certificate is presented from the next connection on, without a
//!   restart. A client certificate is asked for but not required (the Join
//!   service is for nodes that have none yet); every other method starts
//!   with [`Trust::authorize`], which reads the caller's role from its
//!   certificate and refuses revoked ones.
//! - **Clients** connect through [`Trust::channel`] (a manager: the server
//!   must hold a manager certificate) or [`Trust::node_channel`] (one
//!   node's Agent service: the server must be that node). Both refuse a
//!   server whose certificate is revoked.
//!
//! Revocation is a set of certificate serials. A manager answers from the
//! replicated state (a check the manager installs); an agent from the list
//! its heartbeat brings.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::pki::{node_dns_name, peer_identity, CertRole, PeerCert, CLUSTER_DNS_NAME};
use crate::tls::NodeTls;

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("TLS material: {0}")]
    Pem(String),
    #[error("TLS settings: {0}")]
    Tls(#[from] rustls::Error),
    #[error("TLS client verifier: {0}")]
    Verifier(String),
    #[error("certificate: {0}")]
    Cert(#[from] crate::pki::PkiError),
}

/// Answers whether a certificate serial is revoked.
pub type RevocationCheck = Arc<dyn Fn(&str) -> bool + Send + Sync>;

#[derive(Debug, Default)]
struct Revoked {
    version: u64,
    serials: HashSet<String>,
}

/// One generation of TLS settings.
struct Live {
    files: NodeTls,
    me: PeerCert,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

pub struct Trust {
    live: RwLock<Arc<Live>>,
    revoked: Arc<RwLock<Revoked>>,
    check: RwLock<Option<RevocationCheck>>,
    /// [`Trust::shared_channel`]'s channels, by manager address; emptied
    /// when new TLS settings are installed.
    shared: std::sync::Mutex<std::collections::HashMap<String, Channel>>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TrustError> {
    let out = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TrustError::Pem(format!("{what}: {e}")))?;
    if out.is_empty() {
        return Err(TrustError::Pem(format!("{what}: no certificate")));
    }
    Ok(out)
}

impl Live {
    fn build(files: NodeTls, revoked: Arc<RwLock<Revoked>>) -> Result<Live, TrustError> {
        let cas = certs(&files.ca_pem, "CA bundle")?;
        let leaf = certs(&files.cert_pem, "certificate")?;
        let key = PrivateKeyDer::from_pem_slice(files.key_pem.as_bytes()).map_err(|e| TrustError::Pem(format!("key: {e}")))?;
        let me = peer_identity(&leaf[0]).ok_or_else(|| TrustError::Pem("certificate carries no shoal node id or role".into()))?;
        let mut roots = RootCertStore::empty();
        for ca in &cas {
            roots.add(ca.clone())?;
        }
        let roots = Arc::new(roots);
        let p = provider();
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), p.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TrustError::Verifier(e.to_string()))?;
        // The server sends the CA bundle after its own certificate: a
        // joining node pins the CA by the fingerprint in its token.
        let mut chain = leaf.clone();
        chain.extend(cas.iter().cloned());
        let mut server = ServerConfig::builder_with_provider(p.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain, key.clone_key())?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, p.clone())
            .build()
            .map_err(|e| TrustError::Verifier(e.to_string()))?;
        let verifier = Arc::new(ServerVerifier { inner, revoked });
        let mut client = ClientConfig::builder_with_provider(p)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(leaf, key)?;
        client.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Live { files, me, server: Arc::new(server), client: Arc::new(client) })
    }
}

impl Trust {
    pub fn new(files: NodeTls) -> Result<Arc<Trust>, TrustError> {
        let revoked = Arc::new(RwLock::new(Revoked::default()));
        let live = Live::build(files, revoked.clone())?;
        Ok(Arc::new(Trust { live: RwLock::new(Arc::new(live)), revoked, check: RwLock::new(None), shared: Default::default() }))
    }

    fn live(&self) -> Arc<Live> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The material in use.
    pub fn files(&self) -> NodeTls {
        self.live().files.clone()
    }

    /// What this node's own certificate says.
    pub fn me(&self) -> PeerCert {
        self.live().me.clone()
    }

    /// Switches to new material (a renewed certificate, a new CA bundle):
    /// new connections use it; open ones keep theirs.
    pub fn install(&self, files: NodeTls) -> Result<(), TrustError> {
        let live = Live::build(files, self.revoked.clone())?;
        *self.live.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(live);
        // Connections made with the old settings present the old
        // certificate: new ones from here on.
        self.shared.lock().unwrap_or_else(|e| e.into_inner()).clear();
        Ok(())
    }

    /// Revoked serials as a manager's heartbeat lists them, with the
    /// version of that list.
    pub fn set_revoked(&self, version: u64, serials: impl IntoIterator<Item = String>) {
        let mut r = self.revoked.write().unwrap_or_else(|e| e.into_inner());
        r.version = version;
        r.serials = serials.into_iter().collect();
    }

    /// The version of the revocation list last set.
    pub fn revoked_version(&self) -> u64 {
        self.revoked.read().unwrap_or_else(|e| e.into_inner()).version
    }

    /// A manager installs a check against the replicated state.
    pub fn set_revocation_check(&self, check: RevocationCheck) {
        *self.check.write().unwrap_or_else(|e| e.into_inner()) = Some(check);
    }

    pub fn is_revoked(&self, serial: &str) -> bool {
        if self.revoked.read().unwrap_or_else(|e| e.into_inner()).serials.contains(serial) {
            return true;
        }
        let check = self.check.read().unwrap_or_else(|e| e.into_inner()).clone();
        check.is_some_and(|c| c(serial))
    }

    /// A lazily connected channel to a manager at `addr` (host:port): the
    /// server must prove it is a manager.
    pub fn channel(self: &Arc<Self>, addr: &str) -> Result<Channel, tonic::transport::Error> {
        Ok(plain_endpoint(addr)?.connect_with_connector_lazy(self.connector(CLUSTER_DNS_NAME)))
    }

    /// One channel per manager address for all of this node's calls and
    /// streams to it (HTTP/2 multiplexes them over one TLS connection): an
    /// agent handshakes once per manager, not once per loop, and keeps the
    /// connection through errors (the channel reconnects by itself). New TLS
    /// settings ([`Trust::install`]) start new channels.
    pub fn shared_channel(self: &Arc<Self>, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = shared.get(addr) {
            return Ok(c.clone());
        }
        let c = self.channel(addr)?;
        if shared.len() >= 16 {
            // Managers come and go: forget the old ones.
            shared.clear();
        }
        shared.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// A lazily connected channel to the node `node_id` (hex) at `addr`:
    /// the server must prove it is that node.
    pub fn node_channel(self: &Arc<Self>, addr: &str, node_id: &str) -> Result<Channel, tonic::transport::Error> {
        Ok(plain_endpoint(addr)?.connect_with_connector_lazy(self.connector(&node_dns_name(node_id))))
    }

    /// Connects now to a manager at `addr`; `timeout` bounds each request
    /// (the CLI's). The handshake may take up to 5 s: a leader placing
    /// 100,000 tasks is slow to answer but not gone (a dead one refuses at
    /// once).
    pub async fn connect(self: &Arc<Self>, addr: &str, timeout: Option<Duration>) -> Result<Channel, tonic::transport::Error> {
        let mut endpoint = plain_endpoint(addr)?.connect_timeout(Duration::from_secs(5));
        if let Some(t) = timeout {
            endpoint = endpoint.timeout(t);
        }
        endpoint.connect_with_connector(self.connector(CLUSTER_DNS_NAME)).await
    }

    fn connector(self: &Arc<Self>, name: &str) -> Connector {
        Connector { trust: self.clone(), name: name.to_string() }
    }

    /// TLS connections accepted on `listener`, handshaken concurrently
    /// (a slow peer does not hold up the others) with the settings current
    /// at each accept. Dropping the stream closes the listener at once (a
    /// restarted server binds the same port right after).
    pub fn incoming(self: &Arc<Self>, listener: TcpListener) -> Incoming {
        Incoming { listener, trust: self.clone(), handshakes: tokio::task::JoinSet::new() }
    }

    /// The caller's identity from its certificate, if its role is one of
    /// `allowed` and the certificate is not revoked.
    pub fn authorize<T>(&self, req: &Request<T>, allowed: &[CertRole]) -> Result<(String, CertRole), Status> {
        let peer = self.authorize_peer(req, allowed)?;
        if peer.revoked {
            return Err(revoked_status(&peer.cert));
        }
        Ok((peer.cert.subject, peer.cert.role))
    }

    /// As [`Trust::authorize`], but a revoked certificate is returned (with
    /// `revoked` set) rather than refused: the one caller that takes it is
    /// the heartbeat of a node whose role changed, which answers with
    /// nothing but the node's replacement certificate.
    pub fn authorize_peer<T>(&self, req: &Request<T>, allowed: &[CertRole]) -> Result<Peer, Status> {
        let certs = req
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("a client certificate signed by the cluster CA is required"))?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("a client certificate signed by the cluster CA is required"))?;
        let cert = cached_identity(leaf).ok_or_else(|| Status::unauthenticated("client certificate carries no shoal role"))?;
        if !allowed.contains(&cert.role) {
            return Err(Status::permission_denied(format!("a {} certificate may not call this API", cert.role.as_str())));
        }
        let revoked = self.is_revoked(&cert.serial);
        Ok(Peer { cert, revoked })
    }
}

/// See [`Trust::incoming`].
pub struct Incoming {
    listener: TcpListener,
    trust: Arc<Trust>,
    handshakes: tokio::task::JoinSet<Option<tokio_rustls::server::TlsStream<TcpStream>>>,
}

impl tokio_stream::Stream for Incoming {
    type Item = std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            match this.listener.poll_accept(cx) {
                Poll::Ready(Ok((tcp, peer))) => {
                    if let Err(e) = tcp.set_nodelay(true) {
                        tracing::debug!(error = %e, "could not turn off Nagle's algorithm on an accepted connection");
                    }
                    let acceptor = tokio_rustls::TlsAcceptor::from(this.trust.live().server.clone());
                    this.handshakes.spawn(async move {
                        match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => Some(tls),
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake refused");
                                None
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake timed out");
                                None
                            }
                        }
                    });
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
                Poll::Pending => break,
            }
        }
        loop {
            match this.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Some(tls)))) => return Poll::Ready(Some(Ok(tls))),
                Poll::Ready(Some(_)) => continue,
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A caller as [`Trust::authorize_peer`] found it.
#[derive(Clone, Debug)]
pub struct Peer {
    pub cert: PeerCert,
    pub revoked: bool,
}

pub fn revoked_status(cert: &PeerCert) -> Status {
    Status::unauthenticated(format!(
        "certificate {} of {} {} was revoked (the node was removed or changed role, or the client certificate was removed)",
        cert.serial,
        cert.role.as_str(),
        cert.subject
    ))
}

/// The shared client settings ([`crate::tls::settings`]) for `addr`; the
/// scheme is plain http to tonic because the TLS is ours.
fn plain_endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(crate::tls::settings(Endpoint::from_shared(format!("http://{addr}"))?))
}

/// Makes the TCP connection and the TLS handshake for tonic.
#[derive(Clone)]
struct Connector {
    trust: Arc<Trust>,
    name: String,
}

impl tower::Service<tonic::codegen::http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::codegen::http::Uri) -> Self::Future {
        let config = self.trust.live().client.clone();
        let name = self.name.clone();
        Box::pin(async move {
            let host = uri.host().ok_or_else(|| std::io::Error::other(format!("no host in {uri}")))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            let server_name = ServerName::try_from(name).map_err(std::io::Error::other)?;
            let tls = tokio_rustls::TlsConnector::from(config).connect(server_name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// Verifies a server as webpki does (chain to the CA bundle, validity, the
/// expected name: the manager SAN or one node's), then refuses revoked
/// certificates.
#[derive(Debug)]
struct ServerVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    revoked: Arc<RwLock<Revoked>>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        if let Some(p) = peer_identity(end_entity)
            && self.revoked.read().unwrap_or_else(|e| e.into_inner()).serials.contains(&p.serial)
        {
            return Err(rustls::Error::General(format!("the server's certificate {} was revoked", p.serial)));
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `peer_identity` of a certificate, remembered: every request on a
/// connection presents the same certificate, and parsing X.509 on each
/// call is a large share of a small request's cost. TLS has verified the
/// chain already; this only reads the subject.
fn cached_identity(der: &[u8]) -> Option<PeerCert> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static CACHE: OnceLock<Mutex<HashMap<Vec<u8>, PeerCert>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(hit) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(der) {
        return Some(hit.clone());
    }
    let found = peer_identity(der)?;
    let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
    // Certificates are few (one per node and client, renewed now and
    // then); bound it anyway.
    if c.len() >= 4096 {
        c.clear();
    }
    c.insert(der.to_vec(), found.clone());
    Some(found)
}
