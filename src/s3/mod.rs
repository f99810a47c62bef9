//! An S3 client for backup chains kept on object stores (AWS S3, MinIO, Garage, Ceph RGW, …).
//!
//! Requests are signed by `rusty-s3` (SigV4, sans-IO: it builds presigned URLs and never does
//! I/O itself) and sent by `ureq` over rustls: both synchronous, so the engine's rayon workers
//! call them directly and no async runtime sits under the format engine, and both link into
//! the static `qmprestore`. What this module adds is what a backup tool needs of a store:
//! configuration the standard AWS way ([`config`]), retries with backoff and errors that say
//! what went wrong ([`client`]), objects read at any offset with their ETag pinned so a
//! replaced object fails loudly instead of mixing versions ([`object`]), and uploads whose
//! every part the server verifies against a checksum ([`upload`]).
//!
//! Dependencies: `store → s3` (an object-store prefix is one kind of [`crate::store::Place`]);
//! `s3 → qcow2::storage` (objects are byte storage).

pub mod client;
pub mod config;
pub mod error;
pub mod object;
pub mod resume;
pub mod upload;
pub mod url;

pub use client::Client;
pub use config::Config;
pub use error::S3Error;
pub use object::Object;
pub use url::S3Url;
