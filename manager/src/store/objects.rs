//! The objects of the replicated state. These types are the store's disk and
//! log format (they are serialized into Raft entries and snapshots), so they
//! derive serde; the API shapes live in `shoal-proto`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shoal_proto::control::ServiceSpec;

/// A node's role; shared with the agent through `shoal-security`.
pub use shoal_security::Role;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    Ready,
    Down,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Ready => "ready",
            NodeStatus::Down => "down",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    Active,
    Pause,
    Drain,
}

impl Availability {
    pub fn as_str(self) -> &'static str {
        match self {
            Availability::Active => "active",
            Availability::Pause => "pause",
            Availability::Drain => "drain",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Availability::Active),
            "pause" => Some(Availability::Pause),
            "drain" => Some(Availability::Drain),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeObj {
    pub id: u64,
    pub name: String,
    pub role: Role,
    pub status: NodeStatus,
    pub availability: Availability,
    pub labels: BTreeMap<String, String>,
    /// host:port of the node's gRPC server.
    pub address: String,
    /// The node's overlay identity: its WireGuard public key (base64) and
    /// UDP endpoint (ip:port), as its agent reports them.
    pub overlay_key: String,
    pub overlay_endpoint: String,
    pub nano_cpus: u64,
    pub memory_bytes: u64,
    /// The node's CSR, kept so the CA can re-issue its certificate with a new
    /// role on promote/demote without the private key leaving the node.
    pub csr_pem: String,
    /// The certificates issued to this node that have not expired: what
    /// `node rm` and a role change revoke.
    pub certs: Vec<IssuedCert>,
    /// The latest certificate issued to the node (PEM, not secret): handed
    /// to the node until it uses it, so a renewal is one write.
    pub cert_pem: String,
    pub version: u64,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// A certificate the cluster CA signed, as revocation names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCert {
    /// Hex.
    pub serial: String,
    /// "manager", "worker" or "client".
    pub role: String,
    pub expires_ms: u64,
    /// The signing CA's common name (a CA rotation is complete when every
    /// node's and client's current certificate names the new CA).
    pub issuer: String,
}

impl IssuedCert {
    pub fn of(signed: &shoal_security::pki::Signed, role: &str) -> IssuedCert {
        IssuedCert { serial: signed.serial.clone(), role: role.into(), expires_ms: signed.expires_ms, issuer: signed.issuer.clone() }
    }
}

/// A client identity (`client-cert create`): a name for a CLI certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientObj {
    pub name: String,
    pub cert: IssuedCert,
    pub created_at_ms: u64,
}

impl NodeObj {
    /// A ready, active node with no labels; the store stamps version and
    /// times when it applies.
    pub fn new(id: u64, name: &str, role: Role, address: &str) -> Self {
        NodeObj {
            id,
            name: name.to_string(),
            role,
            status: NodeStatus::Ready,
            availability: Availability::Active,
            labels: BTreeMap::new(),
            address: address.to_string(),
            overlay_key: String::new(),
            overlay_endpoint: String::new(),
            nano_cpus: 0,
            memory_bytes: 0,
            csr_pem: String::new(),
            certs: Vec::new(),
            cert_pem: String::new(),
            version: 0,
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceObj {
    pub id: String,
    #[serde(with = "prost_bytes")]
    pub spec: ServiceSpec,
    #[serde(with = "prost_bytes_opt")]
    pub previous_spec: Option<ServiceSpec>,
    /// Network name → the service's virtual IP there (vip endpoint mode),
    /// from the network's last slice; kept across updates.
    pub vips: BTreeMap<String, String>,
    pub version: u64,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// The autoscaler's last decision that changed the replica count.
    pub last_autoscale: Option<AutoscaleDecision>,
    /// The spec came from `service rollback`: it rolls out with its
    /// rollback config. Any other update clears it.
    #[serde(default)]
    pub rolling_back: bool,
    /// Set when an update failed and rolled back on its own (why);
    /// cleared by the next update.
    #[serde(default)]
    pub update_status: String,
    /// When the spec last changed (an update or rollback; not a scale).
    #[serde(default)]
    pub spec_updated_at_ms: u64,
}

/// One autoscaler decision, as recorded with the service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AutoscaleDecision {
    pub at_ms: u64,
    pub from: u64,
    pub to: u64,
    pub reason: String,
}

impl ServiceObj {
    /// A new service; the store stamps version and times when it applies.
    pub fn new(id: String, spec: ServiceSpec) -> Self {
        ServiceObj { id, spec, previous_spec: None, vips: BTreeMap::new(), version: 0, created_at_ms: 0, updated_at_ms: 0, last_autoscale: None, rolling_back: false, update_status: String::new(), spec_updated_at_ms: 0 }
    }
}

/// An image the cluster can run: an OCI manifest, its config and its layer
/// blobs, all held by every manager. Layers are uncompressed tars, so a
/// layer's digest is its diff id and agents fetch only the ones they lack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageObj {
    /// NAME:TAG
    pub reference: String,
    /// sha256:<hex> of the manifest.
    pub digest: String,
    pub config: String,
    /// Layer digests, bottom first.
    pub layers: Vec<String>,
    /// Manifest, config and layers, in bytes.
    pub size: u64,
    pub version: u64,
    pub created_at_ms: u64,
}

impl ImageObj {
    /// Every blob the image needs: manifest, config, layers.
    pub fn blobs(&self) -> impl Iterator<Item = &String> {
        [&self.digest, &self.config].into_iter().chain(&self.layers)
    }
}

/// A network services attach to. The store keeps its definition and its
/// address range (from the cluster pool when none is given); the overlay
/// wires it on the nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkObj {
    pub id: String,
    pub name: String,
    /// IPv4 CIDR, e.g. `100.64.3.0/24`.
    pub subnet: String,
    pub gateway: String,
    /// No route out of the overlay.
    pub internal: bool,
    pub labels: BTreeMap<String, String>,
    /// Each node's slices of the subnet (`a.b.c.d/26`), allocated as its
    /// tasks need addresses; a node's WireGuard peers route them to it.
    pub slices: BTreeMap<u64, Vec<String>>,
    /// Per node, the address it handed out last: the next task takes the
    /// next free one after it (wrapping), as Docker's overlay IPAM does,
    /// so a stopped task's address is not handed out again at once (a
    /// client's cached DNS answer or open flow would reach the new task).
    pub last_address: BTreeMap<u64, u32>,
    pub version: u64,
    pub created_at_ms: u64,
}

/// A named volume (local driver). Its data lives on each node that ran a
/// task mounting it, under the node's data dir; `nodes` says which, and
/// the scheduler uses it to put a replaced task back where its data is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeObj {
    pub id: String,
    pub name: String,
    pub driver: String,
    pub labels: BTreeMap<String, String>,
    /// Docker's local driver options (type, device, o).
    pub options: BTreeMap<String, String>,
    /// Node id → what that node holds.
    pub nodes: BTreeMap<u64, VolumeReplica>,
    pub version: u64,
    pub created_at_ms: u64,
}

/// A volume's data on one node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeReplica {
    /// Bytes on disk, as the node last reported (0 until it does).
    pub size: u64,
    pub updated_at_ms: u64,
}

/// Secrets and configs: named, immutable data that services reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataKind {
    Secret,
    Config,
}

impl DataKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DataKind::Secret => "secret",
            DataKind::Config => "config",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "secret" => Some(DataKind::Secret),
            "config" => Some(DataKind::Config),
            _ => None,
        }
    }
}

/// Largest secret or config, as in Swarm.
pub const MAX_DATA: usize = 500 << 10;

/// A secret or a config. A secret's data never leaves the managers except
/// to the nodes that run a task using it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataObj {
    pub id: String,
    pub name: String,
    pub data: Vec<u8>,
    /// sha256:<hex> of the data.
    pub digest: String,
    pub labels: BTreeMap<String, String>,
    pub version: u64,
    pub created_at_ms: u64,
}

/// Cluster-wide secrets: the CA (so any manager can sign a joining node's
/// certificate) and the join-token secrets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterObj {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    /// Where networks created without `--subnet` get theirs
    /// (`shoal daemon --init --address-pool`).
    pub address_pool: String,
    pub worker_secret: String,
    pub manager_secret: String,
    /// How long node certificates are valid (`cluster update
    /// --cert-expiry`); 0 is the default, 90 days.
    pub cert_expiry_ms: u64,
    /// Autolock's unlock key (`SHOALKEY-1-…`), empty when off. It lives
    /// only in the sealed log: each manager seals its data key with it.
    pub unlock_key: String,
    /// While the CA rotates: the CA certificates trusted (the new one and
    /// the old); empty otherwise (only `ca_cert_pem`).
    pub ca_bundle_pem: String,
    /// While the CA rotates: the new CA cross-signed by the old one, sent
    /// after every leaf the new CA signs.
    pub ca_cross_pem: String,
    pub version: u64,
}

impl ClusterObj {
    pub fn cert_expiry(&self) -> std::time::Duration {
        match self.cert_expiry_ms {
            0 => shoal_security::pki::DEFAULT_CERT_EXPIRY,
            ms => std::time::Duration::from_millis(ms),
        }
    }

    /// The CA certificates every node trusts.
    pub fn trust_bundle(&self) -> &str {
        if self.ca_bundle_pem.is_empty() { &self.ca_cert_pem } else { &self.ca_bundle_pem }
    }

    /// The current CA's common name.
    pub fn ca_name(&self) -> String {
        shoal_security::pki::pem_common_names(&self.ca_cert_pem).into_iter().next().unwrap_or_default()
    }

    /// A certificate the current CA signed, with what peers that trust
    /// only the old CA need to verify it while the CA rotates.
    pub fn chain(&self, leaf_pem: &str) -> String {
        format!("{leaf_pem}{}", self.ca_cross_pem)
    }

    pub fn ca(&self) -> shoal_security::pki::CertKey {
        shoal_security::pki::CertKey { cert_pem: self.ca_cert_pem.clone(), key_pem: self.ca_key_pem.clone() }
    }
}

/// Specs are protobuf messages; inside the store they travel as their
/// protobuf encoding so the spec has one definition.
/// A shared message, as `prost_bytes` writes it.
pub(crate) mod prost_bytes_arc {
    use std::sync::Arc;

    pub fn serialize<S: serde::Serializer, M: prost::Message>(m: &Arc<M>, s: S) -> Result<S::Ok, S::Error> {
        super::prost_bytes::serialize(&**m, s)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>, M: prost::Message + Default>(d: D) -> Result<Arc<M>, D::Error> {
        super::prost_bytes::deserialize(d).map(Arc::new)
    }
}

pub(crate) mod prost_bytes {
    use prost::Message;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer, M: Message>(m: &M, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&m.encode_to_vec())
    }

    pub fn deserialize<'de, D: Deserializer<'de>, M: Message + Default>(d: D) -> Result<M, D::Error> {
        let bytes: Vec<u8> = Deserialize::deserialize(d)?;
        M::decode(bytes.as_slice()).map_err(serde::de::Error::custom)
    }
}

pub(crate) mod prost_bytes_opt {
    use prost::Message;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer, M: Message>(m: &Option<M>, s: S) -> Result<S::Ok, S::Error> {
        match m {
            Some(m) => s.serialize_some(&m.encode_to_vec()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>, M: Message + Default>(
        d: D,
    ) -> Result<Option<M>, D::Error> {
        let bytes: Option<Vec<u8>> = Deserialize::deserialize(d)?;
        bytes
            .map(|b| M::decode(b.as_slice()).map_err(serde::de::Error::custom))
            .transpose()
    }
}

pub(crate) mod prost_bytes_box {
    use prost::Message;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer, M: Message>(m: &M, s: S) -> Result<S::Ok, S::Error> {
        super::prost_bytes::serialize(m, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, M: Message + Default>(d: D) -> Result<Box<M>, D::Error> {
        super::prost_bytes::deserialize(d).map(Box::new)
    }
}
