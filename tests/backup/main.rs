//! qmpbackup against a real QEMU 10 (prelaunch and running, no guest OS): every backup is
//! restored with qmprestore and compared with qemu-img against the disk as it was at the
//! backup instant. One test binary, a module per behaviour; the VM and its backup target
//! are `tests/common/backup_vm.rs`.

#[path = "../common/mod.rs"]
mod common;

/// Runs that fail, are cancelled, interrupted or killed, or meet another run's leftovers.
mod failures;
/// What full, incremental, copy and auto backups hold, for every kind of disk, and how
/// every restore point restores.
mod levels;
/// The original's words, layouts and procedures: info and cleanup, its chains, its
/// restore procedures on ours, file modes and the log.
mod original;
/// The packaged systemd unit and example config, run as systemd runs them.
mod scheduled;
/// How a run treats the VM: its run state, the guest agent, sockets and node names.
mod vm;
