//! `qmpbackup cleanup`: removes the dirty bitmaps of backup chains from the VM's disks.

use anyhow::Result;
use qmpbackup::backup::admin;
use qmpbackup::qmp::Qmp;

#[derive(clap::Args)]
pub struct Args {
    /// Remove every qmpbackup bitmap (required, as in the original).
    #[arg(long, visible_alias = "remove-bitmaps", required = true)]
    remove_bitmap: bool,
    /// Only the bitmaps of this chain id.
    #[arg(long)]
    uuid: Option<String>,
}

pub fn run(qmp: &mut Qmp, a: &Args) -> Result<()> {
    admin::remove_bitmaps(qmp, a.uuid.as_deref())?;
    Ok(())
}
