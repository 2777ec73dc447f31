//! The cluster's public-key infrastructure: the CA, node certificates with
//! the node's role inside, join tokens, and the TLS settings every connection
//! uses.
//!
//! A certificate's subject carries the node id (CN) and its role (OU:
//! `manager`, `worker` or `client`); servers read the role from the peer
//! certificate and refuse calls the role may not make.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use ring::rand::SecureRandom;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Only a manager's certificate names this DNS SAN; clients of the manager
/// APIs (the CLI, agents, other managers) verify servers against it, so a
/// worker's certificate can't pose as a manager, and certificates stay valid
/// when addresses change.
pub const CLUSTER_DNS_NAME: &str = "manager.shoal.cluster";

/// The DNS SAN naming one node (every node certificate has its own): a
/// manager calling a node's Agent service verifies it reached that node.
pub fn node_dns_name(node_id: &str) -> String {
    format!("{node_id}.node.shoal.cluster")
}

/// How long node certificates are valid unless the cluster says otherwise
/// (`cluster update --cert-expiry`), as in Swarm.
pub const DEFAULT_CERT_EXPIRY: std::time::Duration = std::time::Duration::from_secs(90 * 24 * 3600);
/// The shortest `--cert-expiry` accepted: renewal runs at heartbeat pace.
pub const MIN_CERT_EXPIRY: std::time::Duration = std::time::Duration::from_secs(10);
/// Client certificates (the CLI's) last this long unless `--expiry` says
/// otherwise.
pub const DEFAULT_CLIENT_EXPIRY: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);
/// Certificates start this much before they are issued, for clocks a little
/// behind the issuer's.
const CLOCK_SKEW: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate operation failed: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("join token is malformed: expected SHOAL-1-<ca-sha256>-<secret>")]
    MalformedToken,
    #[error("no random bytes from the operating system")]
    Random,
    #[error("cannot parse certificate: {0}")]
    Parse(String),
}

/// The role a certificate grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertRole {
    Manager,
    Worker,
    Client,
}

impl CertRole {
    pub fn as_str(self) -> &'static str {
        match self {
            CertRole::Manager => "manager",
            CertRole::Worker => "worker",
            CertRole::Client => "client",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        match s {
            "manager" => Some(CertRole::Manager),
            "worker" => Some(CertRole::Worker),
            "client" => Some(CertRole::Client),
            _ => None,
        }
    }
}

/// A PEM certificate and its PEM private key.
#[derive(Clone, Debug)]
pub struct CertKey {
    pub cert_pem: String,
    pub key_pem: String,
}

pub fn random_hex(bytes: usize) -> Result<String, PkiError> {
    let mut buf = vec![0u8; bytes];
    ring::rand::SystemRandom::new().fill(&mut buf).map_err(|_| PkiError::Random)?;
    Ok(hex::encode(buf))
}

pub fn random_u64() -> Result<u64, PkiError> {
    let mut buf = [0u8; 8];
    ring::rand::SystemRandom::new().fill(&mut buf).map_err(|_| PkiError::Random)?;
    // Zero is openraft's "no node"; never hand it out.
    Ok(u64::from_le_bytes(buf).max(1))
}

/// Creates a new self-signed cluster CA.
pub fn new_ca() -> Result<CertKey, PkiError> {
    let key = KeyPair::generate()?;
    // Each CA has its own name, so certificates from the old and the new
    // one (during `cluster ca --rotate`) are told apart by their issuer.
    let cert = ca_params(&format!("shoal cluster CA {}", random_hex(4)?))?.self_signed(&key)?;
    Ok(CertKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

fn ca_params(common_name: &str) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

/// The new CA's certificate signed by the old CA: sent after a leaf the new
/// CA signed, it lets a peer that still trusts only the old CA verify the
/// leaf while a rotation spreads.
pub fn cross_sign(old: &CertKey, new: &CertKey) -> Result<String, PkiError> {
    let old_issuer = Issuer::from_ca_cert_pem(&old.cert_pem, KeyPair::from_pem(&old.key_pem)?)?;
    let new_key = KeyPair::from_pem(&new.key_pem)?;
    let name = pem_common_names(&new.cert_pem).into_iter().next().ok_or_else(|| PkiError::Parse("the new CA has no name".into()))?;
    Ok(ca_params(&name)?.signed_by(&new_key, &old_issuer)?.pem())
}

/// What a node sends to say which CA bundle it holds: the sha256 of the
/// text, hex.
pub fn bundle_digest(pem_text: &str) -> String {
    sha256_hex(pem_text.as_bytes())
}

/// The common names of the certificates in a PEM bundle, in order.
pub fn pem_common_names(pem_text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for pem in x509_parser::pem::Pem::iter_from_buffer(pem_text.as_bytes()).filter_map(Result::ok) {
        if let Ok((_, c)) = x509_parser::parse_x509_certificate(&pem.contents)
            && let Some(cn) = c.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok())
        {
            out.push(cn.to_string());
        }
    }
    out
}

/// A fresh key pair and a CSR for it; the key stays on this node.
pub fn new_csr() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let params = CertificateParams::new(Vec::<String>::new())?;
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

/// A certificate the CA signed: the PEM, its serial (hex) and when it
/// expires (ms since the epoch). The serial is what revocation names.
#[derive(Clone, Debug)]
pub struct Signed {
    pub cert_pem: String,
    pub serial: String,
    pub expires_ms: u64,
    /// The signing CA's common name.
    pub issuer: String,
}

fn now_unix() -> std::time::Duration {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default()
}

fn datetime(t: std::time::Duration) -> Result<time::OffsetDateTime, PkiError> {
    time::OffsetDateTime::from_unix_timestamp(t.as_secs() as i64).map_err(|e| PkiError::Parse(e.to_string()))
}

/// Signs `csr_pem` as a certificate for `subject` (a node id, or a client's
/// name) with `role`, valid for `validity`. The subject and role come from
/// the CA side, never from the CSR. A manager's certificate names the
/// manager SAN and its node's; a worker's only its node's; a client's none.
pub fn sign_csr(ca: &CertKey, csr_pem: &str, subject: &str, role: CertRole, validity: std::time::Duration) -> Result<Signed, PkiError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let names = match role {
        CertRole::Manager => vec![CLUSTER_DNS_NAME.to_string(), node_dns_name(subject)],
        CertRole::Worker => vec![node_dns_name(subject)],
        CertRole::Client => Vec::new(),
    };
    let mut params = CertificateParams::new(names)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, subject);
    dn.push(DnType::OrganizationalUnitName, role.as_str());
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = match role {
        CertRole::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        _ => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
    };
    let mut serial = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut serial).map_err(|_| PkiError::Random)?;
    serial[0] &= 0x7f; // a positive INTEGER
    serial[0] |= 0x40; // and no leading zero byte to strip
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let now = now_unix();
    params.not_before = datetime(now.saturating_sub(CLOCK_SKEW))?;
    params.not_after = datetime(now + validity)?;
    let cert = params.signed_by(&csr.public_key, &issuer)?;
    let issuer_cn = pem_common_names(&ca.cert_pem).into_iter().next().unwrap_or_default();
    Ok(Signed { cert_pem: cert.pem(), serial: hex::encode(serial), expires_ms: (now + validity).as_millis() as u64, issuer: issuer_cn })
}

/// Issues a key and certificate in one step (the CA's own node at `--init`,
/// and client credentials).
pub fn issue(ca: &CertKey, subject: &str, role: CertRole, validity: std::time::Duration) -> Result<(CertKey, Signed), PkiError> {
    let (csr, key_pem) = new_csr()?;
    let signed = sign_csr(ca, &csr, subject, role, validity)?;
    Ok((CertKey { cert_pem: signed.cert_pem.clone(), key_pem }, signed))
}

/// The sha256 of the first certificate in `pem`, as lowercase hex.
pub fn fingerprint(pem_text: &str) -> Result<String, PkiError> {
    let der = first_der(pem_text)?;
    Ok(sha256_hex(&der))
}

fn sha256_hex(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

fn first_der(pem_text: &str) -> Result<Vec<u8>, PkiError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem_text.as_bytes()).map_err(|e| PkiError::Parse(e.to_string()))?;
    Ok(pem.contents)
}

/// A parsed join token.
#[derive(Debug, PartialEq, Eq)]
pub struct Token {
    pub ca_fingerprint: String,
    pub secret: String,
}

pub fn format_token(ca_fingerprint: &str, secret: &str) -> String {
    format!("SHOAL-1-{ca_fingerprint}-{secret}")
}

pub fn parse_token(token: &str) -> Result<Token, PkiError> {
    let rest = token.trim().strip_prefix("SHOAL-1-").ok_or(PkiError::MalformedToken)?;
    let (fp, secret) = rest.split_once('-').ok_or(PkiError::MalformedToken)?;
    let hex_ok = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex_ok(fp, 64) || !hex_ok(secret, 32) {
        return Err(PkiError::MalformedToken);
    }
    Ok(Token { ca_fingerprint: fp.to_ascii_lowercase(), secret: secret.to_ascii_lowercase() })
}

/// Compares secrets in constant time.
pub fn secret_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a certificate proves about its holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCert {
    /// The node id (hex) or the client's name.
    pub subject: String,
    pub role: CertRole,
    /// Hex, as [`Signed::serial`].
    pub serial: String,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
    /// The signing CA's common name.
    pub issuer: String,
}

/// The identity a certificate (DER) proves.
pub fn peer_identity(der: &[u8]) -> Option<PeerCert> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let cn = subject.iter_common_name().next()?.as_str().ok()?.to_string();
    let ou = subject.iter_organizational_unit().next()?.as_str().ok()?;
    let ms = |t: x509_parser::time::ASN1Time| u64::try_from(t.timestamp()).unwrap_or(0).saturating_mul(1000);
    Some(PeerCert {
        subject: cn,
        role: CertRole::parse(ou)?,
        serial: hex::encode(cert.raw_serial()),
        not_before_ms: ms(cert.validity().not_before),
        not_after_ms: ms(cert.validity().not_after),
        issuer: cert.issuer().iter_common_name().next().and_then(|cn| cn.as_str().ok()).unwrap_or_default().to_string(),
    })
}

/// [`peer_identity`] of the first certificate in `pem_text`.
pub fn pem_identity(pem_text: &str) -> Result<PeerCert, PkiError> {
    peer_identity(&first_der(pem_text)?).ok_or_else(|| PkiError::Parse("not a shoal certificate (no node id or role)".into()))
}

/// Whether a certificate valid over [`not_before_ms`, `not_after_ms`] is
/// due for renewal at `now_ms`: past two thirds of its life, or living
/// longer than the cluster's current `expiry` allows.
pub fn renewal_due(not_before_ms: u64, not_after_ms: u64, now_ms: u64, expiry: std::time::Duration) -> bool {
    let skew = CLOCK_SKEW.as_millis() as u64;
    let issued = not_before_ms.saturating_add(skew);
    let life = not_after_ms.saturating_sub(issued);
    let expiry_ms = expiry.as_millis() as u64;
    // Certificate times have whole seconds: allow for the rounding.
    now_ms >= issued.saturating_add(life * 2 / 3) || life > expiry_ms.saturating_add(2000)
}

/// A server-certificate verifier for the first contact of a joining node: it
/// trusts the chain only if it contains a CA certificate with the token's
/// fingerprint, and then verifies the chain against that CA as usual. It
/// records the pinned CA so the joiner can use it afterwards.
#[derive(Debug)]
pub struct PinnedCaVerifier {
    fingerprint: String,
    pinned: std::sync::Mutex<Option<Vec<u8>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl PinnedCaVerifier {
    pub fn new(fingerprint: &str) -> Self {
        PinnedCaVerifier {
            fingerprint: fingerprint.to_ascii_lowercase(),
            pinned: std::sync::Mutex::new(None),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }

    /// The pinned CA certificate as PEM, once a handshake succeeded.
    pub fn pinned_ca_pem(&self) -> Option<String> {
        let der = self.pinned.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
        Some(der_to_pem(&der))
    }
}

fn der_to_pem(der: &[u8]) -> String {
    use std::fmt::Write;
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        let _ = writeln!(out, "{}", String::from_utf8_lossy(line));
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| sha256_hex(c) == self.fingerprint)
            .ok_or_else(|| rustls::Error::General("no CA certificate with the join token's fingerprint".into()))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let ok = inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)?;
        *self.pinned.lock().unwrap_or_else(|e| e.into_inner()) = Some(ca.to_vec());
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Connects to `addr` once over TLS, pinning the CA by `fingerprint`, and
/// returns the CA certificate as PEM. Nothing is sent but the handshake.
pub async fn fetch_pinned_ca(addr: &str, fingerprint: &str) -> Result<String, std::io::Error> {
    let verifier = Arc::new(PinnedCaVerifier::new(fingerprint));
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::time::timeout(std::time::Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connecting to {addr} timed out")))??;
    let name = ServerName::try_from(CLUSTER_DNS_NAME).map_err(std::io::Error::other)?;
    let _tls = tokio::time::timeout(std::time::Duration::from_secs(5), connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("TLS handshake with {addr} timed out")))??;
    verifier
        .pinned_ca_pem()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "server presented no pinned CA"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn roles_are_in_certificates() {
        let ca = new_ca().unwrap();
        let (node, signed) = issue(&ca, "00000000000000ab", CertRole::Worker, Duration::from_secs(3600)).unwrap();
        let der = first_der(&node.cert_pem).unwrap();
        let peer = peer_identity(&der).unwrap();
        assert_eq!((peer.subject.as_str(), peer.role), ("00000000000000ab", CertRole::Worker));
        assert_eq!(peer.serial, signed.serial);
        assert_eq!(peer.not_after_ms / 1000, signed.expires_ms / 1000);
        // A worker is named only as itself, never as a manager.
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = format!("{:?}", cert.subject_alternative_name().unwrap().unwrap().value);
        assert!(san.contains("00000000000000ab.node.shoal.cluster") && !san.contains(CLUSTER_DNS_NAME), "{san}");
    }

    #[test]
    fn a_cross_signed_chain_verifies_under_the_old_ca_alone() {
        use rustls::pki_types::pem::PemObject;
        let old = new_ca().unwrap();
        let new = new_ca().unwrap();
        assert_ne!(pem_common_names(&old.cert_pem), pem_common_names(&new.cert_pem));
        let cross = cross_sign(&old, &new).unwrap();
        let (leaf, _) = issue(&new, "00000000000000cd", CertRole::Manager, Duration::from_secs(3600)).unwrap();
        let der = |p: &str| rustls::pki_types::CertificateDer::from_pem_slice(p.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        for (roots_pem, intermediates, ok) in [(&old.cert_pem, vec![der(&cross)], true), (&old.cert_pem, vec![], false), (&new.cert_pem, vec![], true)] {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(der(roots_pem)).unwrap();
            let v = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build().unwrap();
            let name = ServerName::try_from(CLUSTER_DNS_NAME).unwrap();
            let r = v.verify_server_cert(&der(&leaf.cert_pem), &intermediates, &name, &[], UnixTime::now());
            assert_eq!(r.is_ok(), ok, "{r:?}");
        }
    }

    #[test]
    fn renewal_is_due_at_two_thirds_or_when_the_policy_shrinks() {
        let (b, a) = (1_000_000 - CLOCK_SKEW.as_millis() as u64, 1_000_000 + 30_000);
        let exp = Duration::from_secs(30);
        assert!(!renewal_due(b, a, 1_000_000 + 19_000, exp));
        assert!(renewal_due(b, a, 1_000_000 + 20_000, exp));
        assert!(renewal_due(b, a, 1_000_001, Duration::from_secs(10)));
    }

    #[test]
    fn tokens_round_trip_and_reject_garbage() {
        let fp = fingerprint(&new_ca().unwrap().cert_pem).unwrap();
        let secret = random_hex(16).unwrap();
        let t = format_token(&fp, &secret);
        assert_eq!(parse_token(&t).unwrap(), Token { ca_fingerprint: fp, secret });
        for bad in ["", "SHOAL-1-", "SHOAL-2-aa-bb", &t[..t.len() - 1]] {
            assert!(parse_token(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pem_encoding_round_trips() {
        let ca = new_ca().unwrap();
        let der = first_der(&ca.cert_pem).unwrap();
        assert_eq!(der_to_pem(&der).trim(), ca.cert_pem.trim());
    }
}
