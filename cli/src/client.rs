//! The CLI's connection to a manager, with the client credentials.

use std::path::PathBuf;

use anyhow::Context;
use shoal_security::tls::NodeTls;
use shoal_security::Trust;
use shoal_proto::control::control_client::ControlClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::output::Format;

/// Reads: `linearizable` (default) sees every write committed before it,
/// or fails when the manager can't confirm that; `local` answers from the
/// asked manager's state, which may be behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Consistency {
    Linearizable,
    Local,
}

/// Puts the read consistency on every call.
#[derive(Clone, Copy)]
pub struct WithConsistency(Consistency);

impl tonic::service::Interceptor for WithConsistency {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let v = match self.0 {
            Consistency::Linearizable => "linearizable",
            Consistency::Local => "local",
        };
        req.metadata_mut().insert("shoal-consistency", tonic::metadata::MetadataValue::from_static(v));
        Ok(req)
    }
}

/// The Control API client the commands use.
pub type Client = ControlClient<InterceptedService<Channel, WithConsistency>>;

pub struct Ctx {
    pub host: String,
    pub cert_dir: PathBuf,
    pub format: Format,
    pub consistency: Consistency,
}

impl Ctx {
    /// A client whose calls fail after 30 s instead of hanging on a manager
    /// that stopped answering.
    pub async fn control(&self) -> anyhow::Result<Client> {
        self.connect(Some(std::time::Duration::from_secs(30))).await
    }

    /// A client without a per-call deadline, for streams that last
    /// (`service logs -f`, image uploads).
    pub async fn control_streaming(&self) -> anyhow::Result<Client> {
        self.connect(None).await
    }

    /// The Lock service of a manager that restarted locked.
    pub async fn lock(&self) -> anyhow::Result<shoal_proto::control::lock_client::LockClient<tonic::transport::Channel>> {
        Ok(shoal_proto::control::lock_client::LockClient::new(self.channel(Some(std::time::Duration::from_secs(30))).await?))
    }

    async fn connect(&self, timeout: Option<std::time::Duration>) -> anyhow::Result<Client> {
        let channel = self.channel(timeout).await?;
        // Listings of big services (100,000 tasks) are tens of MB.
        Ok(ControlClient::with_interceptor(channel, WithConsistency(self.consistency)).max_decoding_message_size(256 << 20))
    }

    async fn channel(&self, timeout: Option<std::time::Duration>) -> anyhow::Result<tonic::transport::Channel> {
        let read = |f: &str| {
            let p = self.cert_dir.join(f);
            std::fs::read_to_string(&p).with_context(|| format!("reading client credentials {}", p.display()))
        };
        let tls = NodeTls { ca_pem: read("ca.pem")?, cert_pem: read("cert.pem")?, key_pem: read("key.pem")? };
        let trust = Trust::new(tls).with_context(|| format!("client credentials in {}", self.cert_dir.display()))?;
        let channel = trust
            .connect(&self.host, timeout)
            .await
            .with_context(|| format!("cannot reach manager at {}", self.host))?;
        Ok(channel)
    }
}

/// Turns a gRPC status into an error that reads well on a terminal.
pub fn rpc_err(s: tonic::Status) -> anyhow::Error {
    if s.code() == tonic::Code::Unimplemented {
        return anyhow::anyhow!(
            "{} (a manager that restarted with autolock on serves nothing but `shoal cluster unlock` until it is unlocked)",
            s.message()
        );
    }
    anyhow::anyhow!("{}", s.message())
}
