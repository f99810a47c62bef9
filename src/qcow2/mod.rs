//! The qcow2 format engine: one file per on-disk structure, plus the image and chain layers.
//!
//! Nothing here calls qemu-img: `qmprestore` must work on hosts without qemu-utils. Every
//! structure is parsed from untrusted bytes and validated against the specification
//! (`docs/interop/qcow2.rst` in QEMU) and QEMU's own limits before it is used, so a hostile
//! image yields an [`Error`] naming the file and the problem, never a panic or an unbounded
//! allocation.
//!
//! Layers, bottom up: [`storage`] (positional reads), the structures ([`header`], [`ext`],
//! [`l1`], [`l2`], [`refcount`], [`snapshot`], [`bitmap`], [`compress`]), [`image::Qcow2`] (one
//! file), [`disk::Disk`] (an image with its backing chain: reads and block status).

pub mod alloc;
pub mod be;
pub mod bitmap;
pub mod cache;
pub mod check;
pub mod compress;
pub mod create;
pub mod crypto;
pub mod disk;
pub mod error;
pub mod ext;
pub mod fanout;
pub mod fault;
pub mod fuzz;
pub mod header;
pub mod image;
pub mod l1;
pub mod l2;
pub mod lock;
pub mod mapping;
pub mod merged;
pub mod overlap;
pub mod pagecache;
pub mod protocol;
pub mod raw;
pub mod rebuild;
pub mod refcount;
pub mod snapshot;
pub mod storage;
pub mod write;

pub use disk::{Disk, Extent, Format, Image, Layer, OpenOptions};
pub use error::{Error, ErrorKind, Result};
pub use image::{Qcow2, Status};
