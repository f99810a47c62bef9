//! qmpbackup: live backups of QEMU virtual machines over QMP, and native restore of qcow2
//! backup chains without qemu-img.
//!
//! Dependencies flow one way: the binaries (`src/bin`) call [`backup`] (the backup runs,
//! over [`qmp`]), [`chain`] (restore-side commands) and [`serve`] (the NBD server); these
//! build on [`store`] (the backup-folder contract: names, levels, folders, manifests, chain
//! selection), which builds on [`qcow2`] (the format engine). [`cli`] holds what both front
//! ends share; [`net`] the socket type of the QMP client and the NBD server.
//!
//! `bin → backup, chain, serve → store → qcow2`; `backup → qmp → net`; `serve → net`.

pub mod backup;
pub mod chain;
pub mod cli;
pub mod net;
pub mod qcow2;
pub mod qmp;
pub mod s3;
pub mod serve;
pub mod store;
