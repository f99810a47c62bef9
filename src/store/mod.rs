//! The backup-folder contract, below both halves: what qmpbackup writes and qmprestore reads.
//!
//! [`name`] is the file-name grammar and the levels (every spelling of a level lives there),
//! [`folder`] turns a folder into one disk's backup files, its partial files and its restore
//! chain, [`select`] picks the chain up to a restore point and opens it, [`manifest`] is the
//! per-file record with checksums, [`journal`] keeps it exact while a file changes in place,
//! [`time`] the epochs and local times names and `--until` carry. All of it reaches the bytes through [`place::Place`], a place that holds backup
//! files (a local folder now), so another kind of place is another implementation of that
//! trait, not a rewrite. [`keep`] is the retention policy a prune applies (PBS's keep-* rules).
//!
//! Dependencies: `bin → backup, chain → store → qcow2`; `backup → qmp`.

pub mod bucket;
pub mod error;
pub mod folder;
pub mod fuzz;
pub mod journal;
pub mod keep;
pub mod manifest;
pub mod name;
pub mod place;
pub mod select;
pub mod time;

pub use error::StoreError;
pub use folder::{BackupDir, BackupFile, Chain};
pub use name::Level;
pub use place::{Folder, Place};
pub use select::{open_restore_point, ChainSelect, RestorePoint};
