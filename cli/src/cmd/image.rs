//! `shoal image import|load|ls|rm`: the image store of this host.

use std::path::{Path, PathBuf};

use anyhow::Context;
use shoal_agent::image::{ImageStore, SizeLimits};

/// How much an image may unpack to on this host (`shoal daemon`, `shoal
/// image import|load`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SizeLimitArgs {
    /// The most one image layer may unpack to (default 4G): a gzip bomb
    /// stops there with an error, and what it wrote is removed.
    #[arg(long = "max-layer-size", value_name = "SIZE", value_parser = shoal_agent::spec::parse_bytes)]
    pub max_layer_size: Option<u64>,
    /// The most all of one image's layers may unpack to (default 16G).
    #[arg(long = "max-image-size", value_name = "SIZE", value_parser = shoal_agent::spec::parse_bytes)]
    pub max_image_size: Option<u64>,
}

impl SizeLimitArgs {
    pub fn limits(&self) -> SizeLimits {
        let d = SizeLimits::default();
        SizeLimits { layer: self.max_layer_size.unwrap_or(d.layer), image: self.max_image_size.unwrap_or(d.image) }
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum LocalImageCmd {
    /// Make a one-layer image from a rootfs tarball (like `docker import`).
    Import {
        /// Rootfs tarball (plain or gzip).
        rootfs: PathBuf,
        /// NAME[:TAG] to give it.
        reference: String,
        #[command(flatten)]
        limits: SizeLimitArgs,
    },
    /// Load an OCI image-layout or `docker save` archive (plain or gzip).
    Load {
        archive: PathBuf,
        #[command(flatten)]
        limits: SizeLimitArgs,
    },
    /// List images.
    #[command(alias = "list")]
    Ls {
        /// Print one JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Remove image names; layers no image or container uses are deleted.
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        references: Vec<String>,
    },
}

/// Runs one `shoal image` verb against the store under `data_dir`.
pub fn image(cmd: LocalImageCmd, data_dir: &Path) -> anyhow::Result<()> {
    let store = ImageStore::open(data_dir).context("opening the image store")?;
    let store = match &cmd {
        LocalImageCmd::Import { limits, .. } | LocalImageCmd::Load { limits, .. } => store.with_limits(limits.limits()),
        _ => store,
    };
    match cmd {
        LocalImageCmd::Import { rootfs, reference, .. } => {
            let img =
                store.import_rootfs(&rootfs, &reference).with_context(|| format!("importing {}", rootfs.display()))?;
            println!("{}", img.manifest_digest);
        }
        LocalImageCmd::Load { archive, .. } => {
            let imgs = store.load(&archive).with_context(|| format!("loading {}", archive.display()))?;
            for img in imgs {
                let names = if img.names.is_empty() { "<none>".to_string() } else { img.names.join(", ") };
                println!("Loaded image: {names} ({})", img.manifest_digest);
            }
        }
        LocalImageCmd::Ls { json } => {
            let list = store.list()?;
            if json {
                let rows: Vec<serde_json::Value> = list
                    .iter()
                    .map(|(name, img)| {
                        serde_json::json!({
                            "name": name,
                            "id": img.manifest_digest,
                            "config": img.config_digest,
                            "layers": img.layers.len(),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("{:<40} {:<14} LAYERS", "NAME", "ID");
                for (name, img) in list {
                    let short: String = img.manifest_digest.trim_start_matches("sha256:").chars().take(12).collect();
                    println!("{:<40} {:<14} {}", name, short, img.layers.len());
                }
            }
        }
        LocalImageCmd::Rm { references } => {
            for r in references {
                store.remove(&r, &shoal_agent::spec::layers_in_use(&data_dir.join("containers"))).with_context(|| format!("removing {r}"))?;
                println!("Untagged: {r}");
            }
        }
    }
    Ok(())
}
