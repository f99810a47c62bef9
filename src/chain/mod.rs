//! Restore-side commands: what `qmprestore` does with images and backup chains.
//!
//! Each submodule holds one command's logic as a library function the thin binary calls;
//! printing is limited to the report the command exists to produce.

pub mod compare;
pub mod convert;
pub mod create_opts;
pub mod info;
pub mod map;
pub mod progress;
pub mod units;
