//! Service discovery on this node: follows the managers' service view
//! (`Dispatcher.Services`) and hands it to the overlay, whose DNS server
//! and virtual IPs answer from it.

use std::sync::Arc;
use std::time::Duration;

use shoal_overlay::{Overlay, PublishedPort, ServiceEntry};
use shoal_proto::dispatcher::dispatcher_client::DispatcherClient;
use shoal_proto::dispatcher::{ServiceRecord, ServicesRequest};
use shoal_security::Trust;
use tokio::sync::watch;

pub(crate) struct Discovery {
    pub node_id: u64,
    pub tls: Arc<Trust>,
    pub overlay: Arc<Overlay>,
    pub manager: watch::Receiver<Option<String>>,
    pub shutdown: watch::Receiver<bool>,
    /// The managers' peer set version, as the view last said: the session
    /// heartbeats early to fetch peers newer than its own.
    pub peers_version: watch::Sender<u64>,
}

/// The view's records as the overlay takes them; a record the managers
/// got wrong is left out (and said so).
fn entries(records: Vec<ServiceRecord>) -> Vec<ServiceEntry> {
    records
        .into_iter()
        .filter_map(|r| {
            let vip = match r.vip.as_str() {
                "" => None,
                v => match v.parse() {
                    Ok(ip) => Some(ip),
                    Err(_) => {
                        tracing::warn!(service = %r.service, vip = %r.vip, "service view: bad virtual IP, record left out");
                        return None;
                    }
                },
            };
            let addresses = r.addresses.iter().filter_map(|a| a.parse().ok()).collect();
            let ports = r
                .ports
                .iter()
                .filter_map(|p| {
                    let port = PublishedPort {
                        published: u16::try_from(p.published).ok().filter(|p| *p != 0)?,
                        target: u16::try_from(p.target).ok().filter(|p| *p != 0)?,
                        udp: p.protocol == "udp",
                        host_mode: p.mode == "host",
                    };
                    Some(port)
                })
                .collect::<Vec<_>>();
            if ports.len() != r.ports.len() {
                tracing::warn!(service = %r.service, "service view: a published port out of range was left out");
            }
            Some(ServiceEntry { service: r.service, network: r.network, vip, addresses, ports, aliases: r.aliases })
        })
        .collect()
}

impl Discovery {
    pub(crate) async fn run(mut self) {
        loop {
            let addr = self.manager.borrow_and_update().clone();
            if let Some(addr) = addr
                && let Err(e) = self.follow(&addr).await
            {
                tracing::debug!(manager = %addr, error = %e, "service view stream ended");
            }
            if *self.shutdown.borrow() {
                return;
            }
            tokio::select! {
                _ = self.manager.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                _ = self.shutdown.changed() => return,
            }
        }
    }

    async fn follow(&mut self, addr: &str) -> Result<(), String> {
        let channel = self.tls.shared_channel(addr).map_err(|e| e.to_string())?;
        let mut stream = DispatcherClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .services(ServicesRequest { node_id: self.node_id })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        loop {
            let msg = tokio::select! {
                m = stream.message() => m.map_err(|s| s.message().to_string())?,
                _ = self.manager.changed() => return Ok(()),
                _ = self.shutdown.changed() => return Ok(()),
            };
            let Some(view) = msg else { return Ok(()) };
            self.peers_version.send_if_modified(|v| std::mem::replace(v, view.peers_version) != view.peers_version);
            if view.same_records {
                continue;
            }
            if let Err(e) = self.overlay.set_services(entries(view.records)).await {
                tracing::warn!(error = %e, "could not apply the service view");
            }
        }
    }
}
