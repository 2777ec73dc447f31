//! `shoal client-cert create|ls|rm`: more identities for the CLI. The key
//! is made here and never leaves this host; the managers sign a CSR. Each
//! identity can be removed, which revokes its certificate cluster-wide.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use serde_json::{json, Value};
use shoal_proto::control::{ClientCert, ClientCertRef, CreateClientCertRequest, Empty};
use shoal_security::identity::write_file;

use crate::client::{rpc_err, Ctx};
use crate::output::{self, Format};

#[derive(Subcommand)]
pub enum ClientCertCmd {
    /// Issue a client identity and write it to DIR (ca.pem, cert.pem,
    /// key.pem): point `--cert-dir` (or SHOAL_CERT_DIR) at it.
    Create {
        name: String,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// How long it is valid (e.g. 30d; default a year).
        #[arg(long, value_name = "DURATION")]
        expiry: Option<String>,
    },
    /// Renew the identity in --cert-dir (SHOAL_CERT_DIR) in place: a new
    /// key, a certificate from the current CA (needed during `cluster ca
    /// --rotate`); the old certificate is revoked.
    Renew {
        /// How long it is valid (default a year).
        #[arg(long, value_name = "DURATION")]
        expiry: Option<String>,
    },
    /// List client identities.
    Ls,
    /// Remove client identities; their certificates are refused from now on.
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

fn expiry_ms(expiry: Option<String>) -> anyhow::Result<u64> {
    Ok(match expiry {
        Some(e) => u64::try_from(crate::cmd::service::parse_duration("--expiry", &e)?.as_millis()).unwrap_or(u64::MAX).max(1),
        None => 0,
    })
}

/// Renews the CLI's own identity (in `ctx.cert_dir`) with a new key.
pub async fn renew(ctx: &Ctx, expiry_ms: u64) -> anyhow::Result<ClientCert> {
    let (csr_pem, key_pem) = shoal_security::pki::new_csr().context("making a key")?;
    let c = ctx
        .control()
        .await?
        .renew_client_cert(CreateClientCertRequest { name: String::new(), csr_pem, expiry_ms })
        .await
        .map_err(rpc_err)?
        .into_inner();
    // The key first: a certificate without its key is useless, the old key
    // with the old certificate would still be a pair until the cert lands.
    write_file(&ctx.cert_dir.join("key.pem"), &key_pem, true)?;
    write_file(&ctx.cert_dir.join("cert.pem"), &c.cert_pem, false)?;
    write_file(&ctx.cert_dir.join("ca.pem"), &c.ca_pem, false)?;
    Ok(c)
}

fn cert_json(c: &ClientCert) -> Value {
    json!({ "name": c.name, "serial": c.serial, "created_at_ms": c.created_at_ms, "expires_at_ms": c.expires_at_ms })
}

pub async fn run(ctx: &Ctx, cmd: ClientCertCmd) -> anyhow::Result<()> {
    match cmd {
        ClientCertCmd::Create { name, out, expiry } => {
            let expiry_ms = expiry_ms(expiry)?;
            if out.join("key.pem").exists() {
                anyhow::bail!("{} already holds a key.pem: choose another --out", out.display());
            }
            let (csr_pem, key_pem) = shoal_security::pki::new_csr().context("making a key")?;
            let c = ctx
                .control()
                .await?
                .create_client_cert(CreateClientCertRequest { name, csr_pem, expiry_ms })
                .await
                .map_err(rpc_err)?
                .into_inner();
            write_file(&out.join("key.pem"), &key_pem, true)?;
            write_file(&out.join("cert.pem"), &c.cert_pem, false)?;
            write_file(&out.join("ca.pem"), &c.ca_pem, false)?;
            match ctx.format {
                Format::Json => output::object(Format::Json, &cert_json(&c)),
                Format::Table => println!("client {} written to {} (serial {})", c.name, out.display(), c.serial),
            }
        }
        ClientCertCmd::Renew { expiry } => {
            let expiry_ms = expiry_ms(expiry)?;
            let c = renew(ctx, expiry_ms).await?;
            match ctx.format {
                Format::Json => output::object(Format::Json, &cert_json(&c)),
                Format::Table => println!("client {} renewed in {} (serial {})", c.name, ctx.cert_dir.display(), c.serial),
            }
        }
        ClientCertCmd::Ls => {
            let l = ctx.control().await?.list_client_certs(Empty {}).await.map_err(rpc_err)?.into_inner();
            let rows: Vec<Value> = l.certs.iter().map(cert_json).collect();
            output::list(ctx.format, &rows, &[("NAME", "name"), ("SERIAL", "serial"), ("EXPIRES AT (ms)", "expires_at_ms")]);
        }
        ClientCertCmd::Rm { names } => {
            let mut client = ctx.control().await?;
            for name in names {
                client.remove_client_cert(ClientCertRef { name: name.clone() }).await.map_err(rpc_err)?;
                println!("{name}");
            }
        }
    }
    Ok(())
}
