//! qmpbackup: live backups of QEMU virtual machines over QMP, and native restore of qcow2
//! backup chains without qemu-img.
//!
//! Dependencies flow one way: the binaries (`src/bin`) call [`chain`] (restore-side commands
//! on images and backup directories), which builds on [`qcow2`] (the format engine).

pub mod backup;
pub mod chain;
pub mod cli;
pub mod qcow2;
pub mod qmp;
pub mod store;
