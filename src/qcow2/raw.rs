//! A raw image: guest offset = file offset.
//!
//! QEMU sizes raw images in whole 512-byte sectors, so a file whose length is not a multiple
//! of 512 reads as zeros up to the next sector boundary (a hole in map output); we do the same
//! so that sizes, map output and converted images agree with qemu-img.

use super::error::{ErrorKind, Result};
use super::storage::{read_zero_padded, Allocation, Storage};
use std::path::{Path, PathBuf};

pub struct Raw {
    path: PathBuf,
    storage: Box<dyn Storage>,
    file_len: u64,
}

impl Raw {
    pub fn from_storage(path: &Path, storage: Box<dyn Storage>) -> Result<Raw> {
        let file_len = storage.size().map_err(|e| ErrorKind::Io(e).at(path))?;
        Ok(Raw {
            path: path.to_path_buf(),
            storage,
            file_len,
        })
    }

    /// Virtual size: the file length rounded up to whole sectors.
    pub fn size(&self) -> u64 {
        self.file_len.div_ceil(512) * 512
    }

    pub fn allocated_bytes(&self) -> Option<u64> {
        self.storage.allocated_bytes()
    }

    pub fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        read_zero_padded(&*self.storage, buf, offset).map_err(|e| ErrorKind::Io(e).at(&self.path))
    }

    /// Whether `offset` starts data or a hole, and how many bytes (1..=`max`) it lasts.
    pub fn allocation(&self, offset: u64, max: u64) -> Result<(bool, u64)> {
        if offset >= self.file_len {
            return Ok((false, max));
        }
        let a = self
            .storage
            .allocation(offset)
            .map_err(|e| ErrorKind::Io(e).at(&self.path))?;
        let (data, end) = match a {
            Allocation::DataUntil(e) => (true, e.min(self.file_len)),
            Allocation::HoleUntil(e) => (false, e),
        };
        Ok((data, (end.max(offset + 1) - offset).min(max)))
    }
}
