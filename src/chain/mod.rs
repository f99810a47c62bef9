//! Restore-side commands: what `qmprestore` does with images and backup chains.
//!
//! Each submodule holds one command's logic as a library function the thin binary calls;
//! printing is limited to the report the command exists to produce.

pub mod commit;
pub mod compare;
pub mod convert;
pub mod create_opts;
pub mod damage;
pub mod error;
pub mod info;
pub mod keys;
pub mod links;
pub mod list;
pub mod map;
pub mod merge;
pub mod outdir;
pub mod progress;
pub mod prune;
pub mod rebase;
pub mod snapshot_rebase;
pub mod throttle;
pub mod units;
pub mod verify;
pub mod workers;
