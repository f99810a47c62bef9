//! qmpbackup: live backups of QEMU virtual machines over QMP, and native restore of qcow2
//! backup chains without qemu-img.
//!
//! Dependencies flow one way. The binaries (`src/bin/*/`, one module per command) call
//! [`backup`] (the backup runs, over [`qmp`]), [`chain`] (restore-side commands) and
//! [`serve`] (the NBD server); these build on [`store`] (the backup-folder contract: names,
//! levels, folders, manifests, chain selection, object-store prefixes), which builds on [`s3`]
//! (the object-store client) and [`qcow2`] (the format engine). [`cli`] holds what both front
//! ends share; [`net`] the socket type of the QMP client and the NBD server.
//!
//! ```text
//! backup → store, s3, qmp, qcow2, cli    chain → store, s3, qcow2    serve → store, qcow2, net
//! store  → s3, qcow2                     s3    → qcow2               qmp   → net
//! ```
//! `tests/layering.rs` holds this table and fails on an import against it.

pub mod backup;
pub mod chain;
pub mod cli;
pub mod net;
pub mod qcow2;
pub mod qmp;
pub mod s3;
pub mod serve;
pub mod store;
