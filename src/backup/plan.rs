//! Which level each disk gets: the decision `auto` makes and the checks `inc` needs.
//!
//! An incremental backup is only correct if the dirty bitmap has recorded every write since
//! the chain's last backup. That is not the case when the bitmap is missing (new chain; QEMU
//! restarted and the bitmap was not persistent, as for raw disks), inconsistent (QEMU was
//! killed), disabled or busy (another job uses it), when the disk was resized, or when a
//! partial file of another tool shows a run that may have cleared it. `auto` then takes a full
//! backup of that disk and says why; `inc` refuses with the same reason. The original's
//! `auto` looked only at the `uuid` file and failed on all of these.

use super::device::Device;
use crate::store::Level;
use std::path::PathBuf;

/// The level asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requested {
    Copy,
    Full,
    Inc,
    Auto,
}

/// What is known about one disk's chain before the run.
#[derive(Debug, Default)]
pub struct ChainState {
    /// The folder that holds the disk's backups.
    pub dir: PathBuf,
    /// The chain id in the target directory.
    pub uuid: Option<String>,
    /// `--monthly` started a new month.
    pub new_month: bool,
    /// Name and virtual size of the newest file of the current chain (FULL or INC).
    pub last: Option<(String, u64)>,
    /// `*.partial` files in the folder, whatever their names, that no interrupted run of ours
    /// left (those are removed): another tool's run that may have cleared the bitmap, or
    /// anything else. As in the original, every one blocks an incremental.
    pub partials: Vec<String>,
    /// Partial files set aside earlier that are newer than the chain's FULL.
    pub foreign_partials: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub level: Level,
    /// The chain bitmap as named on the disk now (for inc), or to be created.
    pub bitmap: Option<String>,
    /// The file an INC builds on.
    pub parent: Option<String>,
    /// Why `auto` chose a full backup.
    pub reason: Option<NoInc>,
}

/// Why a disk cannot have an incremental backup now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoInc {
    NoChain,
    NewMonth,
    /// A partial file in the folder.
    Partial(String),
    /// A partial file set aside earlier, newer than the chain's FULL.
    ForeignPartial(String),
    NoFull,
    BitmapMissing {
        name: String,
        cannot_persist: bool,
    },
    BitmapInconsistent(String),
    BitmapBusy(String),
    BitmapDisabled(String),
    Resized {
        from: u64,
        to: u64,
        since: String,
    },
}

impl std::fmt::Display for NoInc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoInc::NoChain => write!(f, "no chain in the target directory yet (no uuid file)"),
            NoInc::NewMonth => write!(f, "a new month started (--monthly)"),
            NoInc::Partial(p) => write!(
                f,
                "partial backup {p} found: an interrupted run may have cleared the bitmap"
            ),
            NoInc::ForeignPartial(p) => write!(
                f,
                "partial backup {p} of an interrupted run by another tool: its bitmap may have been cleared"
            ),
            NoInc::NoFull => write!(f, "no FULL backup of this disk in the target directory"),
            NoInc::BitmapMissing {
                name,
                cannot_persist,
            } => {
                write!(f, "dirty bitmap {name} is missing")?;
                if *cannot_persist {
                    write!(f, " (this disk's bitmaps cannot be persistent, as it is not a qcow2 v3 image: they vanish when QEMU restarts)")?;
                }
                Ok(())
            }
            NoInc::BitmapInconsistent(b) => write!(
                f,
                "dirty bitmap {b} is inconsistent (QEMU did not shut down cleanly)"
            ),
            NoInc::BitmapBusy(b) => write!(f, "dirty bitmap {b} is in use by another job"),
            NoInc::BitmapDisabled(b) => write!(f, "dirty bitmap {b} is disabled"),
            NoInc::Resized { from, to, since } => write!(
                f,
                "the disk was resized ({from} -> {to} bytes) since {since}"
            ),
        }
    }
}

impl NoInc {
    /// The refusal of `--level inc`: the original's message where it had one (scripts grep
    /// those), followed by ours.
    fn refusal(&self, dev: &Device, st: &ChainState) -> String {
        let dir = st.dir.display();
        let original = match self {
            NoInc::NoChain => Some(format!(
                "Unable to get UUID for incremental backup: [Failed to read file [{}]]",
                st.dir.parent().unwrap_or(&st.dir).join("uuid").display()
            )),
            NoInc::Partial(_) | NoInc::ForeignPartial(_) => Some(format!(
                "Partial backup found in [{dir}], possible broken backup chain. Execute new full backup"
            )),
            NoInc::NoFull => Some(format!(
                "No full backup found for device [{}:{}] in [{dir}]: Execute full backup first.",
                dev.node,
                dev.basename()
            )),
            NoInc::BitmapMissing { .. } => Some(format!(
                "[{}:{}] Incremental backup requested but no active bitmap has been found.",
                dev.node, dev.filename
            )),
            NoInc::BitmapInconsistent(_) | NoInc::BitmapBusy(_) | NoInc::BitmapDisabled(_) => {
                Some(format!(
                    "Bitmap for device [{}:{}] is not in state ready for backup.",
                    dev.node,
                    dev.basename()
                ))
            }
            NoInc::NewMonth | NoInc::Resized { .. } => None,
        };
        let ours = format!(
            "{}: incremental backup impossible: {self}; take a full backup (--level full or auto)",
            dev.name
        );
        match original {
            Some(o) => format!("{o} ({ours})"),
            None => ours,
        }
    }
}

/// The chain bitmap's name for chain `uuid`.
pub fn bitmap_name(uuid: &str) -> String {
    format!("qmpbackup-{uuid}")
}

/// The existing chain bitmap of `dev`: ours (`qmpbackup-<uuid>`), or the name an older
/// version of the original used (`qmpbackup-<device>-<uuid>`).
pub fn chain_bitmap<'a>(dev: &'a Device, uuid: &str) -> Option<&'a super::device::Bitmap> {
    dev.bitmap(&bitmap_name(uuid)).or_else(|| {
        dev.bitmaps
            .iter()
            .find(|b| b.name.starts_with("qmpbackup-") && b.name.ends_with(uuid))
    })
}

/// Why an incremental backup of `dev` is not possible, or the bitmap and parent it uses.
fn incremental(dev: &Device, st: &ChainState) -> Result<(String, String), NoInc> {
    let uuid = st.uuid.as_deref().ok_or(NoInc::NoChain)?;
    if st.new_month {
        return Err(NoInc::NewMonth);
    }
    if let Some(p) = st.partials.first() {
        return Err(NoInc::Partial(p.clone()));
    }
    if let Some(p) = st.foreign_partials.first() {
        return Err(NoInc::ForeignPartial(p.clone()));
    }
    let (parent, size) = st.last.clone().ok_or(NoInc::NoFull)?;
    let b = chain_bitmap(dev, uuid).ok_or_else(|| NoInc::BitmapMissing {
        name: bitmap_name(uuid),
        cannot_persist: !dev.can_persist_bitmaps(),
    })?;
    if b.inconsistent {
        return Err(NoInc::BitmapInconsistent(b.name.clone()));
    }
    if b.busy {
        return Err(NoInc::BitmapBusy(b.name.clone()));
    }
    if !b.recording {
        return Err(NoInc::BitmapDisabled(b.name.clone()));
    }
    if size != dev.virtual_size {
        return Err(NoInc::Resized {
            from: size,
            to: dev.virtual_size,
            since: parent,
        });
    }
    Ok((b.name.clone(), parent))
}

pub fn decide(req: Requested, dev: &Device, st: &ChainState) -> Result<Decision, String> {
    let full = |reason| Decision {
        level: Level::Full,
        bitmap: None,
        parent: None,
        reason,
    };
    match req {
        Requested::Copy => Ok(Decision {
            level: Level::Copy,
            bitmap: None,
            parent: None,
            reason: None,
        }),
        Requested::Full => Ok(full(None)),
        Requested::Inc | Requested::Auto => match incremental(dev, st) {
            Ok((bitmap, parent)) => Ok(Decision {
                level: Level::Inc,
                bitmap: Some(bitmap),
                parent: Some(parent),
                reason: None,
            }),
            Err(why) if req == Requested::Auto => Ok(full(Some(why))),
            Err(why) => Err(why.refusal(dev, st)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::device::Bitmap;

    fn dev(bitmaps: Vec<Bitmap>) -> Device {
        Device {
            name: "disk0".into(),
            node: "disk0".into(),
            qdev: Some("vd0".into()),
            format: "qcow2".into(),
            filename: "/vm/d0.qcow2".into(),
            virtual_size: 1 << 20,
            cluster_size: Some(65536),
            compat: None,
            lazy_refcounts: false,
            read_only: false,
            bitmaps,
            image: serde_json::Value::Null,
        }
    }

    fn bm(inconsistent: bool, recording: bool) -> Bitmap {
        Bitmap {
            name: "qmpbackup-u1".into(),
            recording,
            persistent: true,
            busy: false,
            inconsistent,
            count: 0,
        }
    }

    #[test]
    fn auto_falls_back_to_full_and_says_why() {
        // A chain that allows an incremental, and each way it can fail.
        let good = || ChainState {
            dir: "/b/d0.qcow2".into(),
            uuid: Some("u1".into()),
            last: Some(("FULL-1-d0.qcow2".into(), 1 << 20)),
            ..Default::default()
        };
        let recording = || dev(vec![bm(false, true)]);
        let d = decide(Requested::Auto, &recording(), &good()).unwrap();
        assert_eq!(
            (d.level, d.parent.as_deref()),
            (Level::Inc, Some("FULL-1-d0.qcow2"))
        );
        let with = |f: fn(&mut ChainState)| {
            let mut st = good();
            f(&mut st);
            st
        };
        let cases: Vec<(Device, ChainState, &str)> = vec![
            (dev(vec![]), good(), "missing"),
            (dev(vec![bm(true, false)]), good(), "inconsistent"),
            (dev(vec![bm(false, false)]), good(), "disabled"),
            (recording(), with(|s| s.uuid = None), "no chain"),
            (recording(), with(|s| s.last = None), "no FULL"),
            (
                recording(),
                with(|s| s.last = Some(("F".into(), 5))),
                "resized",
            ),
            (
                recording(),
                with(|s| s.foreign_partials = vec!["INC-5-d.partial".into()]),
                "another tool",
            ),
            (
                recording(),
                with(|s| s.partials = vec!["FULL-bar.partial".into()]),
                "FULL-bar.partial",
            ),
            (recording(), with(|s| s.new_month = true), "month"),
        ];
        for (d, st, why) in cases {
            let auto = decide(Requested::Auto, &d, &st).unwrap();
            assert_eq!(auto.level, Level::Full);
            assert!(
                auto.reason.as_ref().unwrap().to_string().contains(why),
                "{auto:?} / {why}"
            );
            let inc = decide(Requested::Inc, &d, &st).unwrap_err();
            assert!(inc.contains(why), "{inc}");
        }
        // The original's words come first where it had them: scripts grep those.
        let refusal =
            |f: fn(&mut ChainState)| decide(Requested::Inc, &recording(), &with(f)).unwrap_err();
        let inc = refusal(|s| s.partials = vec!["FULL-bar.partial".into()]);
        assert!(
            inc.starts_with("Partial backup found in [/b/d0.qcow2], possible broken backup chain. Execute new full backup"),
            "{inc}"
        );
        let inc = refusal(|s| s.last = None);
        assert!(
            inc.starts_with("No full backup found for device [disk0:d0.qcow2] in [/b/d0.qcow2]: Execute full backup first."),
            "{inc}"
        );
    }
}
