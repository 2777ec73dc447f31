//! `shoal image import|load|ls|rm` against the cluster: the archive is
//! checked on this machine first (a bad archive never leaves it), then
//! streamed to a manager, which keeps it as a content-addressed blob that
//! every manager replicates and agents fetch.

use std::path::Path;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use shoal_proto::control::{Empty, ImageChunk, ImageRef};
use tokio::io::AsyncReadExt;

use crate::client::{rpc_err, Ctx};
use crate::cmd::image::LocalImageCmd;
use crate::output;

/// Checks `path` by loading it into a throwaway store; returns the
/// references an archive names.
fn check_locally(path: &Path, kind: &str, reference: Option<&str>) -> anyhow::Result<Vec<String>> {
    let tmp = std::env::temp_dir().join(format!("shoal-image-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let res = (|| {
        let store = shoal_agent::image::ImageStore::open(&tmp)?;
        if kind == "rootfs" {
            let r = reference.unwrap_or_default();
            store.import_rootfs(path, r)?;
            Ok(vec![shoal_agent::image::normalize_reference(r)?])
        } else {
            let imgs = store.load(path)?;
            Ok(imgs.into_iter().flat_map(|i| i.names).collect())
        }
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    res.map_err(|e: shoal_agent::image::ImageError| anyhow::anyhow!("{e}"))
}

async fn upload(ctx: &Ctx, path: &Path, reference: &str, kind: &str) -> anyhow::Result<Value> {
    let mut file = tokio::fs::File::open(path).await.with_context(|| format!("opening {}", path.display()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(ImageChunk { reference: reference.to_string(), kind: kind.to_string(), data: vec![] }).await?;
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                return anyhow::Ok(());
            }
            if tx.send(ImageChunk { data: buf[..n].to_vec(), ..Default::default() }).await.is_err() {
                return Ok(());
            }
        }
    });
    let img = ctx
        .control_streaming()
        .await?
        .import_image(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(rpc_err)?
        .into_inner();
    reader.await??;
    Ok(json!({"reference": img.reference, "digest": img.digest, "size": img.size, "kind": img.kind, "created_at_ms": img.created_at_ms}))
}

pub async fn run(ctx: &Ctx, cmd: LocalImageCmd) -> anyhow::Result<()> {
    match cmd {
        LocalImageCmd::Import { rootfs, reference } => {
            let refs = check_locally(&rootfs, "rootfs", Some(&reference))
                .with_context(|| format!("checking {}", rootfs.display()))?;
            let r = refs.first().cloned().unwrap_or(reference);
            let v = upload(ctx, &rootfs, &r, "rootfs").await?;
            println!("{}", v["reference"].as_str().unwrap_or_default());
        }
        LocalImageCmd::Load { archive } => {
            let refs = check_locally(&archive, "archive", None).with_context(|| format!("checking {}", archive.display()))?;
            if refs.is_empty() {
                bail!("{} names no image (no repo tag): the cluster needs a NAME:TAG", archive.display());
            }
            for r in refs {
                let v = upload(ctx, &archive, &r, "archive").await?;
                println!("Loaded image: {}", v["reference"].as_str().unwrap_or_default());
            }
        }
        LocalImageCmd::Ls { json: as_json } => {
            let list = ctx.control().await?.list_images(Empty {}).await.map_err(rpc_err)?.into_inner().images;
            let rows: Vec<Value> = list
                .iter()
                .map(|i| json!({"reference": i.reference, "digest": i.digest, "size": i.size, "kind": i.kind, "created_at_ms": i.created_at_ms}))
                .collect();
            let format = if as_json { output::Format::Json } else { ctx.format };
            output::list(format, &rows, &[("REFERENCE", "reference"), ("DIGEST", "digest"), ("SIZE", "size"), ("KIND", "kind")]);
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
