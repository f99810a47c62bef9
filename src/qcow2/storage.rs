//! Byte storage behind an image: a file, or memory (fuzzing, tests).
//!
//! Everything reads with positional I/O (`pread`), so one open file serves any number of
//! threads at once without a shared cursor. A short read means end of file; callers decide
//! whether that is an error (metadata) or reads as zeros (data, as QEMU does).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// Whether a byte range of the storage holds data or is a hole (reads as zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Data up to (excluding) the given offset.
    DataUntil(u64),
    /// A hole up to (excluding) the given offset.
    HoleUntil(u64),
}

/// Random-access, read-only byte storage shared between threads.
pub trait Storage: Send + Sync {
    /// Reads at `offset`; returns fewer bytes than asked only at end of storage.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Current length in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Whether `offset` (< len) is in data or in a hole, and until where. Storage that cannot
    /// tell reports data, as QEMU does.
    fn allocation(&self, offset: u64) -> io::Result<Allocation> {
        Ok(Allocation::DataUntil(self.size()?.max(offset)))
    }
    /// Bytes actually allocated on the host, if known (`du`, not `ls -l`).
    fn allocated_bytes(&self) -> Option<u64> {
        None
    }
    /// The file behind this storage, for in-kernel copies.
    fn as_file(&self) -> Option<&File> {
        None
    }
    /// Whether each read is a round trip over the network: callers then keep more reads in
    /// flight.
    fn is_remote(&self) -> bool {
        false
    }
}

impl Storage for File {
    fn read_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while !buf.is_empty() {
            match FileExt::read_at(self, buf, offset) {
                Ok(0) => break,
                Ok(n) => {
                    done += n;
                    offset += n as u64;
                    buf = &mut buf[n..];
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn allocation(&self, offset: u64) -> io::Result<Allocation> {
        let fd = self.as_raw_fd();
        let len = Storage::size(self)?;
        let seek = |whence| {
            // SAFETY: lseek on a file descriptor we own; it only moves the file cursor, which
            // this module never uses (all reads are positional).
            let r = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(r as u64)
            }
        };
        match seek(libc::SEEK_DATA) {
            Ok(data) if data == offset => match seek(libc::SEEK_HOLE) {
                Ok(hole) => Ok(Allocation::DataUntil(hole.max(offset + 1))),
                Err(_) => Ok(Allocation::DataUntil(len.max(offset + 1))),
            },
            Ok(data) => Ok(Allocation::HoleUntil(data)),
            // ENXIO: no data after offset (trailing hole).
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                Ok(Allocation::HoleUntil(len.max(offset + 1)))
            }
            // File systems without SEEK_DATA: everything is data.
            Err(_) => Ok(Allocation::DataUntil(len.max(offset + 1))),
        }
    }

    fn allocated_bytes(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        self.metadata().ok().map(|m| m.blocks() * 512)
    }

    fn as_file(&self) -> Option<&File> {
        Some(self)
    }
}

impl Storage for Vec<u8> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.len());
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(Vec::len(self) as u64)
    }
}

/// Reads exactly `buf.len()` bytes or fails with `UnexpectedEof` naming what was read.
pub fn read_exact(
    storage: &dyn Storage,
    buf: &mut [u8],
    offset: u64,
    what: &str,
) -> io::Result<()> {
    let n = storage.read_at(buf, offset)?;
    if n < buf.len() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "{what} at offset {offset:#x} ({} bytes) extends past the end of the file",
                buf.len()
            ),
        ));
    }
    Ok(())
}

/// Reads into `buf`, filling whatever lies past the end of storage with zeros.
pub fn read_zero_padded(storage: &dyn Storage, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let n = storage.read_at(buf, offset)?;
    buf[n..].fill(0);
    Ok(())
}

/// Makes a new, renamed or deleted directory entry durable: fsyncs the folder holding `path`.
pub fn sync_parent(path: &std::path::Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    File::open(parent)?.sync_all()
}
