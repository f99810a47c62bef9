//! The images a run creates natively before QEMU sees them: the `.partial` backup target (as
//! the source disk is laid out, or raw for a raw disk's full copy) and the fleecing image.

use super::Disk_;
use crate::backup::device::Device;
use crate::backup::error::{BackupError, Result};
use crate::qcow2::create::{create_file, CreateOptions};
use crate::qcow2::{Disk, Format};
use crate::store::manifest::Manifest;
use crate::store::place::Folder;
use std::path::Path;

pub(super) fn target_cluster_size(dev: &Device) -> u64 {
    dev.cluster_size
        .filter(|c| c.is_power_of_two() && (512..=2 << 20).contains(c))
        .unwrap_or(65536)
}

pub(super) fn fleece_options(dev: &Device) -> CreateOptions {
    CreateOptions {
        size: dev.virtual_size,
        cluster_size: target_cluster_size(dev),
        ..Default::default()
    }
}

pub(super) fn create_image(path: &Path, opts: &CreateOptions) -> Result<()> {
    create_file(path, opts, true).map(drop)?;
    Ok(())
}

/// The `.partial` target: qcow2 with the source's compat, cluster size and lazy refcounts. An
/// INC is a standalone delta, as the original writes it (its restore procedures copy and
/// delete INCs one at a time, and fail on INCs that name a predecessor); with `link` it names
/// its predecessor as backing file, so the chain describes itself and QEMU or qemu-img can
/// open the newest INC directly. A raw source's FULL or COPY is a sparse raw file.
pub(super) fn create_target(d: &Disk_, link: bool) -> Result<()> {
    if d.target_format == Format::Raw {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&d.rec.partial)
            .map_err(BackupError::io(&d.rec.partial))?;
        f.set_len(d.dev.virtual_size)
            .map_err(BackupError::io(&d.rec.partial))?;
        return Ok(());
    }
    let backing = match d.decision.parent.as_ref().filter(|_| link) {
        Some(parent) => {
            let path = d.dir.join(parent);
            // A predecessor uploaded and removed (--push-only) is described by its manifest.
            let fmt = match Manifest::read(&Folder::new(&d.dir), parent) {
                Ok(m) if !path.exists() => Format::from_name(&m.format).unwrap_or(Format::Qcow2),
                _ => Disk::open_alone(&path)?.format(),
            };
            Some((
                parent.clone(),
                Some(if fmt == Format::Raw {
                    Format::Raw
                } else {
                    Format::Qcow2
                }),
            ))
        }
        None => None,
    };
    let opts = CreateOptions {
        size: d.dev.virtual_size,
        cluster_size: target_cluster_size(&d.dev),
        version: if d.dev.compat.as_deref() == Some("0.10") {
            2
        } else {
            3
        },
        lazy_refcounts: d.dev.lazy_refcounts && d.dev.compat.as_deref() != Some("0.10"),
        backing,
        ..Default::default()
    };
    create_image(&d.rec.partial, &opts)
}
