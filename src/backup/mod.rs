//! The backup half: `qmpbackup` takes full, incremental and copy backups of a running (or
//! prelaunch) VM's disks over QMP, with image fleecing.
//!
//! [`device`] reads the VM's disks, [`plan`] decides each disk's level, [`layout`] places the
//! files (compatible with the original tool), [`fleece`] builds the block-graph changes,
//! [`job`] waits for the jobs, [`state`] guards the target directory and records what a run
//! has created, and [`run`] puts them in the order that makes the backup exact and safe.
//! [`admin`] holds the `info` and `cleanup` commands, [`vm`] the pre-flight all commands share,
//! [`log`] the log in the original's format, [`push`] the upload of a target folder to an
//! object store.

pub mod admin;
pub mod device;
pub mod error;
pub mod fleece;
pub mod fuzz;
pub mod job;
pub mod layout;
pub mod log;
pub mod plan;
pub mod push;
pub mod run;
pub mod state;
pub mod vm;

pub use error::{BackupError, Result};
