//! The WireGuard data plane: one TUN device and one UDP socket per node,
//! boringtun's `Tunn` for the protocol (handshakes, timers, rekeying,
//! cookies), and our own packet I/O: the TUN side reads GSO super-packets
//! (virtio-net header, TSO) split into segments in one call and writes
//! decrypted packets back coalesced (GRO), in batches, into buffers sized
//! once per task.
//!
//! Cryptokey routing as WireGuard does it: a packet from the TUN goes to
//! the peer whose allowed IPs hold its destination; a packet from a peer is
//! delivered only if its source is in that peer's allowed IPs. Peers are
//! known by their endpoint: a datagram from any other address is dropped
//! before any crypto runs.
//!
//! One exception, for the routing mesh: a peer forwards a client's
//! connection to a task here with the client's own address as the source
//! (so the task sees who called). Such a packet is delivered when its
//! source is outside the cluster's address pool (an overlay address from
//! the wrong peer is still dropped), and its flow is remembered per peer
//! (`meshflow`): the task's replies, which the kernel routes back into the
//! TUN, go to the peer the flow came from, and two flows with one 4-tuple
//! from two peers are told apart by the task through a rewritten port.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tun_rs::{AsyncDevice, DeviceBuilder, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use crate::OverlayError;
use crate::meshflow::{self, MeshFlows};

/// The TUN's MTU: a 1500-byte underlay less WireGuard's 60 bytes over IPv4
/// (and some room), as wireguard-go defaults to.
pub const MTU: u16 = 1420;
/// The most one GSO send may carry (a UDP datagram's limit, less headers).
const MAX_GSO_BYTES: usize = 65_000;
/// The UDP socket's send and receive buffers.
const SOCKET_BUFFER: usize = 8 << 20;
/// Room for one packet (MTU) in a batch buffer, with the virtio header.
const PACKET_ROOM: usize = 2048;
/// Room for a coalesced (GRO) super-packet: an IP packet's 64 KiB and
/// tun-rs's requirement of twice the virtio header.
const GRO_ROOM: usize = 2 * VIRTIO_NET_HDR_LEN + 65_535;
/// A peer as the agent's session reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub node_id: u64,
    pub name: String,
    pub public_key: [u8; 32],
    pub endpoint: SocketAddr,
    /// The node's slices: (network address, prefix length).
    pub allowed: Vec<(Ipv4Addr, u8)>,
}

struct Peer {
    cfg: PeerConfig,
    /// (network, mask) as integers.
    ranges: Vec<(u32, u32)>,
    /// The WireGuard session, shared with this peer's earlier versions: a
    /// packet loop may still hold the peer list from before an update, and
    /// each version must drive the same session. (Moving the session into
    /// the new version and leaving a fresh one in the old let a loop that
    /// still held the old list start a second handshake; the peer then sent
    /// on a session the current version didn't have, and every packet from
    /// it was refused until a rekey 15 s later.)
    tunn: Arc<Mutex<Tunn>>,
    tx_bytes: Arc<AtomicU64>,
    rx_bytes: Arc<AtomicU64>,
}

impl Peer {
    fn allows(&self, ip: u32) -> bool {
        self.ranges.iter().any(|(net, mask)| ip & mask == *net)
    }
}

#[derive(Default)]
struct Peers {
    list: Vec<Arc<Peer>>,
    by_endpoint: HashMap<SocketAddr, usize>,
}

impl Peers {
    fn for_destination(&self, ip: u32) -> Option<&Arc<Peer>> {
        self.list.iter().find(|p| p.allows(ip))
    }
}

struct Inner {
    secret: StaticSecret,
    peers: RwLock<Arc<Peers>>,
    udp: UdpSocket,
    /// GSO/GRO and batched receive on `udp` (quinn-udp).
    udp_state: quinn_udp::UdpSocketState,
    tun: AsyncDevice,
    offload: bool,
    next_index: AtomicU32,
    /// Datagrams dropped: unknown sender, or not WireGuard.
    dropped: AtomicU64,
    /// The cluster's address pool as (network, mask); (0, 0) until known,
    /// which holds every address (no mesh traffic is taken before then).
    pool: AtomicU64,
    flows: Mutex<MeshFlows>,
    /// Seconds since start, advanced by the timers (a cheap clock for flows).
    now_secs: AtomicU64,
}

impl Inner {
    fn in_pool(&self, ip: u32) -> bool {
        let p = self.pool.load(Ordering::Relaxed);
        let (net, mask) = ((p >> 32) as u32, p as u32);
        ip & mask == net
    }

    /// A mesh packet `peer` brought here for a task: remembers its flow
    /// and gives it the source port the task must see. False when it must
    /// be dropped (no ports, or no room for another flow).
    fn mesh_inbound(&self, pkt: &mut [u8], from: SocketAddr) -> bool {
        let Some(t) = meshflow::tuple(pkt) else {
            // Later fragments carry no ports: the first one made the way.
            return is_later_fragment(pkt);
        };
        let now = self.now_secs.load(Ordering::Relaxed);
        let port = self.flows.lock().unwrap_or_else(|e| e.into_inner()).inbound(&t, from, now);
        match port {
            Some(p) => {
                meshflow::set_port(pkt, &t, true, p);
                true
            }
            None => false,
        }
    }

    /// A task's reply to a mesh client (its destination is no peer's): the
    /// endpoint of the peer its flow came through, with the client's own
    /// port put back.
    fn mesh_reply(&self, pkt: &mut [u8]) -> Option<SocketAddr> {
        let t = meshflow::tuple(pkt)?;
        let now = self.now_secs.load(Ordering::Relaxed);
        let (peer, port) = self.flows.lock().unwrap_or_else(|e| e.into_inner()).reply(&t, now)?;
        meshflow::set_port(pkt, &t, false, port);
        Some(peer)
    }
}

/// An IPv4 fragment other than the first.
fn is_later_fragment(pkt: &[u8]) -> bool {
    pkt.len() >= 20 && pkt[0] >> 4 == 4 && u16::from_be_bytes([pkt[6], pkt[7]]) & 0x1fff != 0
}

/// The running data plane; cheap to clone.
#[derive(Clone)]
pub struct DataPlane {
    inner: Arc<Inner>,
    tun_name: String,
}

pub struct DataPlaneConfig {
    pub tun_name: String,
    pub port: u16,
    pub secret: StaticSecret,
}

impl DataPlane {
    /// Creates the TUN device and binds the UDP port, then runs the packet
    /// loops until `shutdown`. Must run inside a tokio runtime.
    pub async fn start(cfg: DataPlaneConfig, shutdown: watch::Receiver<bool>) -> Result<DataPlane, OverlayError> {
        let io = |what: String| move |source| OverlayError::Io { what, source };
        // After a role change the node's previous data plane may still hold
        // the device (EBUSY) while its tasks stop: wait for it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let first = loop {
            match DeviceBuilder::new().name(&cfg.tun_name).mtu(MTU).offload(true).build_async() {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                r => break r,
            }
        };
        let (tun, offload) = match first {
            Ok(t) => (t, true),
            Err(e) => {
                tracing::warn!(tun = %cfg.tun_name, error = %e, "TUN offloads (TSO/GRO) unavailable: one packet per read and write");
                let t = DeviceBuilder::new().name(&cfg.tun_name).mtu(MTU).build_async().map_err(io(format!("creating TUN {}", cfg.tun_name)))?;
                (t, false)
            }
        };
        let udp = loop {
            match UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, cfg.port))).await {
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                r => break r.map_err(io(format!("binding UDP port {}", cfg.port)))?,
            }
        };
        // Bursts of a whole TSO super-packet arrive at once: the default
        // socket buffers (~200 KiB) overflow and TCP sees the drops.
        for (opt, name) in [(true, "receive"), (false, "send")] {
            let set = if opt {
                nix::sys::socket::setsockopt(&udp, nix::sys::socket::sockopt::RcvBufForce, &SOCKET_BUFFER)
            } else {
                nix::sys::socket::setsockopt(&udp, nix::sys::socket::sockopt::SndBufForce, &SOCKET_BUFFER)
            };
            if let Err(e) = set {
                tracing::warn!(error = %e, "could not enlarge the overlay socket's {name} buffer");
            }
        }
        let udp_state = quinn_udp::UdpSocketState::new((&udp).into()).map_err(io("setting up the overlay socket".into()))?;
        tracing::info!(
            tun = %cfg.tun_name,
            port = cfg.port,
            tun_offload = offload,
            udp_gso_segments = udp_state.max_gso_segments(),
            udp_gro_segments = udp_state.gro_segments(),
            "overlay data plane up"
        );
        let inner = Arc::new(Inner {
            secret: cfg.secret,
            peers: RwLock::new(Arc::new(Peers::default())),
            udp_state,
            udp,
            tun,
            offload,
            next_index: AtomicU32::new(1),
            dropped: AtomicU64::new(0),
            pool: AtomicU64::new(0),
            flows: Mutex::new(MeshFlows::default()),
            now_secs: AtomicU64::new(0),
        });
        tokio::spawn(until(shutdown.clone(), tun_to_udp(inner.clone())));
        tokio::spawn(until(shutdown.clone(), udp_to_tun(inner.clone())));
        tokio::spawn(until(shutdown, timers(inner.clone())));
        Ok(DataPlane { inner, tun_name: cfg.tun_name })
    }

    pub fn tun_name(&self) -> &str {
        &self.tun_name
    }

    pub fn public_key(&self) -> [u8; 32] {
        PublicKey::from(&self.inner.secret).to_bytes()
    }

    /// Datagrams dropped so far (unknown sender or not WireGuard).
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// (peer name, tx bytes, rx bytes, time since its last handshake)
    pub fn stats(&self) -> Vec<(String, u64, u64, Option<Duration>)> {
        let peers = self.inner.peers.read().unwrap_or_else(|e| e.into_inner()).clone();
        peers
            .list
            .iter()
            .map(|p| {
                let hs = p.tunn.lock().unwrap_or_else(|e| e.into_inner()).time_since_last_handshake();
                (p.cfg.name.clone(), p.tx_bytes.load(Ordering::Relaxed), p.rx_bytes.load(Ordering::Relaxed), hs)
            })
            .collect()
    }

    /// The cluster's address pool: sources outside it are routing-mesh
    /// clients.
    pub fn set_pool(&self, net: Ipv4Addr, prefix: u8) {
        let mask = crate::prefix_mask(prefix);
        let p = (u64::from(u32::from(net) & mask) << 32) | u64::from(mask);
        self.inner.pool.store(p, Ordering::Relaxed);
    }

    /// Replaces the peer set. A peer whose key and endpoint are unchanged
    /// keeps its session.
    pub fn set_peers(&self, peers: Vec<PeerConfig>) {
        let old = self.inner.peers.read().unwrap_or_else(|e| e.into_inner()).clone();
        let next = next_peers(&old, peers, |key| self.new_tunn(key));
        *self.inner.peers.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
    }

    fn new_tunn(&self, key: &[u8; 32]) -> Tunn {
        // boringtun shifts the index left by 8: keep it below 2^24.
        let index = self.inner.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
        Tunn::new(self.inner.secret.clone(), PublicKey::from(*key), None, Some(25), index, None)
    }
}

/// The peer list for `peers`, from the list in use: a peer whose key and
/// endpoint are unchanged keeps its session (shared, not moved: loops may
/// still hold `old`); a new one gets a session from `new_tunn`.
fn next_peers(old: &Peers, peers: Vec<PeerConfig>, mut new_tunn: impl FnMut(&[u8; 32]) -> Tunn) -> Peers {
    let mut next = Peers::default();
    for cfg in peers {
        let ranges = cfg
            .allowed
            .iter()
            .map(|(net, len)| {
                let mask = crate::prefix_mask(*len);
                (u32::from(*net) & mask, mask)
            })
            .collect();
        let kept = old.list.iter().find(|p| p.cfg.public_key == cfg.public_key && p.cfg.endpoint == cfg.endpoint);
        let peer = match kept {
            Some(p) if p.cfg == cfg => p.clone(),
            // Same session, new allowed IPs: the new version shares it.
            Some(p) => Arc::new(Peer { cfg, ranges, tunn: p.tunn.clone(), tx_bytes: p.tx_bytes.clone(), rx_bytes: p.rx_bytes.clone() }),
            None => {
                tracing::info!(peer = %cfg.name, endpoint = %cfg.endpoint, slices = cfg.allowed.len(), "overlay peer added");
                let tunn = Arc::new(Mutex::new(new_tunn(&cfg.public_key)));
                Arc::new(Peer { cfg, ranges, tunn, tx_bytes: Arc::default(), rx_bytes: Arc::default() })
            }
        };
        next.by_endpoint.insert(peer.cfg.endpoint, next.list.len());
        next.list.push(peer);
    }
    for p in &old.list {
        if !next.list.iter().any(|n| n.cfg.public_key == p.cfg.public_key) {
            tracing::info!(peer = %p.cfg.name, endpoint = %p.cfg.endpoint, "overlay peer removed");
        }
    }
    next
}

async fn until(mut shutdown: watch::Receiver<bool>, f: impl std::future::Future<Output = ()>) {
    tokio::select! {
        _ = shutdown.wait_for(|s| *s) => {}
        _ = f => {}
    }
}

fn dst_v4(pkt: &[u8]) -> Option<u32> {
    (pkt.len() >= 20 && pkt[0] >> 4 == 4).then(|| u32::from_be_bytes([pkt[16], pkt[17], pkt[18], pkt[19]]))
}

/// Consecutive encrypted packets for one peer, of one size (the last may
/// be shorter): sent with one `sendmsg` as UDP GSO segments.
struct Run {
    endpoint: SocketAddr,
    start: usize,
    segment: usize,
    count: usize,
    /// A shorter segment ended it.
    closed: bool,
}

/// Sends `run`'s bytes of `buf`; one syscall for the whole run where the
/// kernel does UDP GSO.
async fn flush(inner: &Inner, buf: &[u8], run: &Run, end: usize) {
    let contents = &buf[run.start..end];
    let t = quinn_udp::Transmit {
        destination: run.endpoint,
        ecn: None,
        contents,
        segment_size: (run.count > 1).then_some(run.segment),
        src_ip: None,
    };
    let sent = inner.udp.async_io(tokio::io::Interest::WRITABLE, || inner.udp_state.try_send((&inner.udp).into(), &t)).await;
    if let Err(e) = sent {
        tracing::warn!(peer = %run.endpoint, segments = run.count, bytes = contents.len(), error = %e, "sending to overlay peer failed");
    }
}

/// Encrypts what the TUN gives us and sends it to the owning peer.
async fn tun_to_udp(inner: Arc<Inner>) {
    let mut original = vec![0u8; VIRTIO_NET_HDR_LEN + 65535];
    let mut bufs = vec![vec![0u8; PACKET_ROOM]; IDEAL_BATCH_SIZE];
    let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
    // Encrypted packets of one batch, back to back.
    let mut out = vec![0u8; IDEAL_BATCH_SIZE * (PACKET_ROOM + 64)];
    loop {
        // quinn-udp lowers this to 1 when the kernel refuses GSO at run time.
        let max_segments = inner.udp_state.max_gso_segments().clamp(1, 64);
        let n = if inner.offload {
            match inner.tun.recv_multiple(&mut original, &mut bufs, &mut sizes, 0).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the overlay TUN failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        } else {
            match inner.tun.recv(&mut bufs[0]).await {
                Ok(len) => {
                    sizes[0] = len;
                    1
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the overlay TUN failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        };
        let peers = inner.peers.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut at = 0usize;
        let mut run: Option<Run> = None;
        for i in 0..n {
            let pkt = &mut bufs[i][..sizes[i]];
            let Some(d) = dst_v4(pkt) else { continue };
            let peer = match peers.for_destination(d) {
                Some(p) => p,
                // A task's reply to a mesh client: back to the node the
                // connection came through.
                None => match inner.mesh_reply(pkt).and_then(|ep| peers.by_endpoint.get(&ep)) {
                    Some(i) => &peers.list[*i],
                    None => continue,
                },
            };
            let len = {
                let mut t = peer.tunn.lock().unwrap_or_else(|e| e.into_inner());
                match t.encapsulate(pkt, &mut out[at..]) {
                    TunnResult::WriteToNetwork(d) => d.len(),
                    TunnResult::Err(e) => {
                        tracing::debug!(peer = %peer.cfg.name, error = ?e, "encapsulate failed");
                        continue;
                    }
                    _ => continue,
                }
            };
            peer.tx_bytes.fetch_add(pkt.len() as u64, Ordering::Relaxed);
            // A GSO send is one UDP datagram to the kernel: at most 64 KiB.
            let joins = run.as_ref().is_some_and(|r| {
                r.endpoint == peer.cfg.endpoint
                    && !r.closed
                    && r.count < max_segments
                    && len <= r.segment
                    && (at - r.start) + len <= MAX_GSO_BYTES
            });
            if joins {
                if let Some(r) = run.as_mut() {
                    r.count += 1;
                    r.closed = len < r.segment;
                }
            } else {
                if let Some(r) = run.take() {
                    flush(&inner, &out, &r, at).await;
                }
                run = Some(Run { endpoint: peer.cfg.endpoint, start: at, segment: len, count: 1, closed: false });
            }
            at += len;
        }
        if let Some(r) = run.take() {
            flush(&inner, &out, &r, at).await;
        }
    }
}

/// Decrypts what peers send and hands it to the TUN in batches: one
/// `recvmmsg` brings several GRO trains of datagrams.
async fn udp_to_tun(inner: Arc<Inner>) {
    const MSGS: usize = 16;
    let mut bufs: Vec<Vec<u8>> = vec![vec![0u8; 65536]; MSGS];
    let mut metas = vec![quinn_udp::RecvMeta::default(); MSGS];
    let mut reply = vec![0u8; PACKET_ROOM + 64];
    // GRO coalesces a flow's packets into the first one's buffer, and only
    // where that buffer can hold a whole super-packet without growing
    // (tun-rs refuses to reallocate): with less room every packet would be
    // written to the TUN on its own. Capacity is reserved, not touched.
    let mut outs: Vec<Vec<u8>> = (0..IDEAL_BATCH_SIZE).map(|_| Vec::with_capacity(GRO_ROOM)).collect();
    let mut gro = GROTable::default();
    loop {
        let got = {
            let mut slices: Vec<std::io::IoSliceMut<'_>> = bufs.iter_mut().map(|b| std::io::IoSliceMut::new(b)).collect();
            inner.udp.async_io(tokio::io::Interest::READABLE, || inner.udp_state.recv((&inner.udp).into(), &mut slices, &mut metas)).await
        };
        let msgs = match got {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "overlay socket receive failed");
                continue;
            }
        };
        let mut ready = 0usize;
        for (m, meta) in metas.iter().enumerate().take(msgs) {
            let stride = meta.stride.max(1);
            for datagram in bufs[m][..meta.len].chunks(stride) {
                if handle_datagram(&inner, datagram, meta.addr, &mut outs[ready], &mut reply).await.is_some() {
                    ready += 1;
                }
                if ready == outs.len() {
                    write_tun(&inner, &mut gro, &mut outs[..ready]).await;
                    ready = 0;
                }
            }
        }
        if ready > 0 {
            write_tun(&inner, &mut gro, &mut outs[..ready]).await;
        }
    }
}

async fn write_tun(inner: &Inner, gro: &mut GROTable, outs: &mut [Vec<u8>]) {
    let res = if inner.offload {
        inner.tun.send_multiple(gro, outs, VIRTIO_NET_HDR_LEN).await.map(|_| ())
    } else {
        let mut r = Ok(());
        for o in outs.iter() {
            if let Err(e) = inner.tun.send(&o[VIRTIO_NET_HDR_LEN..]).await {
                r = Err(e);
            }
        }
        r
    };
    if let Err(e) = res {
        tracing::debug!(error = %e, "writing to the overlay TUN failed");
    }
}

/// Runs one datagram through its peer's `Tunn`; answers handshakes. If it
/// carried a packet for us, leaves it in `out` after the virtio header
/// room and returns its length.
async fn handle_datagram(inner: &Inner, datagram: &[u8], from: SocketAddr, out: &mut Vec<u8>, reply: &mut [u8]) -> Option<usize> {
    let peers = inner.peers.read().unwrap_or_else(|e| e.into_inner()).clone();
    let Some(peer) = peers.by_endpoint.get(&from).map(|i| peers.list[*i].clone()) else {
        inner.dropped.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(from = %from, "datagram from an address that is no overlay peer: dropped");
        return None;
    };
    // boringtun panics when its output buffer is smaller than the datagram:
    // nothing we send is this large, so such a datagram is garbage.
    if datagram.len() > PACKET_ROOM {
        inner.dropped.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(from = %from, len = datagram.len(), "oversized datagram on the overlay port: dropped");
        return None;
    }
    out.clear();
    out.resize(VIRTIO_NET_HDR_LEN + PACKET_ROOM, 0);
    let mut delivered = None;
    let mut to_send: Vec<Vec<u8>> = Vec::new();
    {
        let mut t = peer.tunn.lock().unwrap_or_else(|e| e.into_inner());
        match t.decapsulate(Some(from.ip()), datagram, &mut out[VIRTIO_NET_HDR_LEN..]) {
            TunnResult::WriteToTunnelV4(pkt, src) => {
                let len = pkt.len();
                let src = u32::from(src);
                if peer.allows(src) {
                    delivered = Some(len);
                } else if !inner.in_pool(src) && inner.mesh_inbound(pkt, from) {
                    // A routing-mesh client's packet, its source kept.
                    delivered = Some(len);
                } else {
                    tracing::debug!(peer = %peer.cfg.name, src = %Ipv4Addr::from(src), "packet from outside the peer's allowed IPs: dropped");
                }
            }
            TunnResult::WriteToNetwork(d) => {
                to_send.push(d.to_vec());
                // Flush what was queued behind the handshake.
                while let TunnResult::WriteToNetwork(d) = t.decapsulate(None, &[], reply) {
                    to_send.push(d.to_vec());
                }
            }
            TunnResult::WriteToTunnelV6(..) => {}
            TunnResult::Done => {}
            TunnResult::Err(e) => {
                inner.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(peer = %peer.cfg.name, error = ?e, "datagram refused by WireGuard");
            }
        }
    }
    for d in to_send {
        if let Err(e) = inner.udp.send_to(&d, from).await {
            tracing::debug!(peer = %peer.cfg.name, error = %e, "answering overlay peer failed");
        }
    }
    let len = delivered?;
    peer.rx_bytes.fetch_add(len as u64, Ordering::Relaxed);
    out.truncate(VIRTIO_NET_HDR_LEN + len);
    Some(len)
}

/// Handshake retries, keepalives and rekeying, every 250 ms as boringtun's
/// own device does.
async fn timers(inner: Arc<Inner>) {
    let mut buf = vec![0u8; PACKET_ROOM];
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let start = tokio::time::Instant::now();
    let mut last_sweep = 0u64;
    loop {
        tick.tick().await;
        let now = start.elapsed().as_secs();
        inner.now_secs.store(now, Ordering::Relaxed);
        if now >= last_sweep + 10 {
            last_sweep = now;
            inner.flows.lock().unwrap_or_else(|e| e.into_inner()).sweep(now);
        }
        let peers = inner.peers.read().unwrap_or_else(|e| e.into_inner()).clone();
        for p in &peers.list {
            let send = {
                let mut t = p.tunn.lock().unwrap_or_else(|e| e.into_inner());
                match t.update_timers(&mut buf) {
                    TunnResult::WriteToNetwork(d) => Some(d.len()),
                    _ => None,
                }
            };
            if let Some(len) = send
                && let Err(e) = inner.udp.send_to(&buf[..len], p.cfg.endpoint).await
            {
                tracing::debug!(peer = %p.cfg.name, error = %e, "overlay timer send failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(name: &str, key: [u8; 32], slices: &[(Ipv4Addr, u8)]) -> PeerConfig {
        PeerConfig { node_id: 1, name: name.into(), public_key: key, endpoint: "198.51.100.2:51820".parse().unwrap(), allowed: slices.to_vec() }
    }

    #[test]
    fn a_peer_update_shares_the_session_with_the_list_still_in_use() {
        let mine = StaticSecret::from([7u8; 32]);
        let theirs = PublicKey::from(&StaticSecret::from([9u8; 32])).to_bytes();
        let mut made = 0;
        let mut new_tunn = |key: &[u8; 32]| {
            made += 1;
            Tunn::new(mine.clone(), PublicKey::from(*key), None, None, made, None)
        };
        let first = next_peers(&Peers::default(), vec![cfg("n2", theirs, &[(Ipv4Addr::new(100, 64, 0, 0), 26)])], &mut new_tunn);
        // The node gets a second slice: a new version of the peer...
        let second = next_peers(&first, vec![cfg("n2", theirs, &[(Ipv4Addr::new(100, 64, 0, 0), 26), (Ipv4Addr::new(100, 64, 0, 128), 26)])], &mut new_tunn);
        assert!(!Arc::ptr_eq(&first.list[0], &second.list[0]));
        assert!(second.list[0].allows(u32::from(Ipv4Addr::new(100, 64, 0, 130))));
        // ...on the same session, which a loop holding `first` still drives.
        assert!(Arc::ptr_eq(&first.list[0].tunn, &second.list[0].tunn));
        assert!(Arc::ptr_eq(&first.list[0].tx_bytes, &second.list[0].tx_bytes));
        // Unchanged: the same peer. A new key: a new session.
        let third = next_peers(&second, vec![cfg("n2", theirs, &[(Ipv4Addr::new(100, 64, 0, 0), 26), (Ipv4Addr::new(100, 64, 0, 128), 26)])], &mut new_tunn);
        assert!(Arc::ptr_eq(&second.list[0], &third.list[0]));
        let rekeyed = next_peers(&third, vec![cfg("n2", [3u8; 32], &[])], &mut new_tunn);
        assert!(!Arc::ptr_eq(&third.list[0].tunn, &rekeyed.list[0].tunn));
        assert_eq!(made, 2);
    }
}
