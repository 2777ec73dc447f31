//! `shoal image import|load|ls|rm` against the cluster. The archive is
//! loaded on this machine first into a throwaway store that keeps each
//! layer's uncompressed tar (a bad archive never leaves the machine). Then
//! each image goes to a manager as blobs: the manager says which of the
//! manifest, config and layers it lacks, the CLI pushes only those, and
//! names the image by its manifest. Every manager replicates the blobs;
//! agents fetch the layers they lack.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use shoal_agent::image::{ImageParts, ImageStore};
use shoal_proto::control::{BlobList, BlobUpload, Empty, ImageRef, PutImageRequest};
use tokio::io::AsyncReadExt;

use crate::client::{rpc_err, Ctx};
use crate::cmd::image::LocalImageCmd;
use crate::output;

/// A throwaway export store, removed when dropped.
struct Staging {
    dir: PathBuf,
    store: ImageStore,
}

impl Staging {
    fn new(limits: shoal_agent::image::SizeLimits) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("shoal-image-{}-{}", std::process::id(), shoal_agent::image::random_hex(4)));
        let store = ImageStore::open_export(&dir).with_context(|| format!("creating {}", dir.display()))?.with_limits(limits);
        Ok(Staging { dir, store })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Loads `path` into a staging store; returns the store and the
/// references it holds.
fn stage(path: &Path, kind: &str, reference: Option<&str>, limits: shoal_agent::image::SizeLimits) -> anyhow::Result<(Staging, Vec<String>)> {
    let staging = Staging::new(limits)?;
    let refs = if kind == "rootfs" {
        let r = reference.unwrap_or_default();
        let img = staging.store.import_rootfs(path, r).map_err(|e| anyhow::anyhow!("{e}"))?;
        img.names
    } else {
        let imgs = staging.store.load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
        imgs.into_iter().flat_map(|i| i.names).collect()
    };
    Ok((staging, refs))
}

/// Sends one staged image to the cluster: only the blobs the manager lacks.
async fn upload(ctx: &Ctx, store: &ImageStore, reference: &str) -> anyhow::Result<Value> {
    let ImageParts { manifest_digest, config_digest, layers } =
        store.parts(reference).map_err(|e| anyhow::anyhow!("{e}"))?;
    let all: Vec<String> = [manifest_digest.clone(), config_digest].into_iter().chain(layers).collect();
    let missing = ctx
        .control()
        .await?
        .missing_blobs(BlobList { digests: all })
        .await
        .map_err(rpc_err)?
        .into_inner()
        .digests;
    for digest in missing {
        let path = store.blob_file(&digest).map_err(|e| anyhow::anyhow!("{e}"))?;
        push_blob(ctx, &path, &digest).await.with_context(|| format!("pushing blob {digest}"))?;
    }
    let img = ctx
        .control()
        .await?
        .put_image(PutImageRequest { reference: reference.to_string(), manifest_digest })
        .await
        .map_err(rpc_err)?
        .into_inner();
    Ok(image_json(&img))
}

async fn push_blob(ctx: &Ctx, path: &Path, digest: &str) -> anyhow::Result<()> {
    let mut file = tokio::fs::File::open(path).await.with_context(|| format!("opening {}", path.display()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(BlobUpload { digest: digest.to_string(), data: vec![] }).await?;
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                return anyhow::Ok(());
            }
            if tx.send(BlobUpload { data: buf[..n].to_vec(), ..Default::default() }).await.is_err() {
                return Ok(());
            }
        }
    });
    ctx.control_streaming()
        .await?
        .push_blob(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(rpc_err)?;
    reader.await??;
    Ok(())
}

fn image_json(i: &shoal_proto::control::Image) -> Value {
    json!({"reference": i.reference, "digest": i.digest, "size": i.size, "layers": i.layers, "created_at_ms": i.created_at_ms})
}

pub async fn run(ctx: &Ctx, cmd: LocalImageCmd) -> anyhow::Result<()> {
    match cmd {
        LocalImageCmd::Import { rootfs, reference, limits } => {
            let (staging, refs) = stage(&rootfs, "rootfs", Some(&reference), limits.limits())
                .with_context(|| format!("checking {}", rootfs.display()))?;
            let r = refs.first().cloned().unwrap_or(reference);
            let v = upload(ctx, &staging.store, &r).await?;
            println!("{}", v["reference"].as_str().unwrap_or_default());
        }
        LocalImageCmd::Load { archive, limits } => {
            let (staging, refs) =
                stage(&archive, "archive", None, limits.limits()).with_context(|| format!("checking {}", archive.display()))?;
            if refs.is_empty() {
                bail!("{} names no image (no repo tag): the cluster needs a NAME:TAG", archive.display());
            }
            for r in refs {
                let v = upload(ctx, &staging.store, &r).await?;
                println!("Loaded image: {}", v["reference"].as_str().unwrap_or_default());
            }
        }
        LocalImageCmd::Ls { json: as_json } => {
            let list = ctx.control().await?.list_images(Empty {}).await.map_err(rpc_err)?.into_inner().images;
            let rows: Vec<Value> = list.iter().map(image_json).collect();
            let format = if as_json { output::Format::Json } else { ctx.format };
            output::list(format, &rows, &[("REFERENCE", "reference"), ("DIGEST", "digest"), ("SIZE", "size"), ("LAYERS", "layers")]);
        }
        LocalImageCmd::Rm { references } => {
            let mut c = ctx.control().await?;
            for reference in references {
                c.remove_image(ImageRef { reference: reference.clone() }).await.map_err(rpc_err)?;
                println!("{reference}");
            }
        }
    }
    Ok(())
}
