//! Compressed clusters: streams packed back to back into host clusters (a host cluster then
//! carries one reference per stream in it), each replacing a whole guest cluster's mapping;
//! a cluster that does not shrink is stored plainly, as QEMU stores it.

use super::Writer;
use crate::qcow2::error::{ErrorKind, Result};
use crate::qcow2::fault::pwrite;
use crate::qcow2::header::CompressionType;
use crate::qcow2::l2::{CompressedDescriptor, L2Entry};

impl Writer {
    /// Writes whole guest clusters in compressed form. `clusters` pairs a guest cluster index
    /// with its compressed stream (from [`compress_cluster`]), or with the plain data when it
    /// does not compress; compress them in parallel before calling this.
    pub fn write_compressed(&mut self, clusters: &[(u64, Compressed)]) -> Result<()> {
        if self.data.is_some() {
            return Err(self.at(ErrorKind::Unsupported(
                "compressed clusters are not possible with an external data file".into(),
            )));
        }
        if self.encrypted() {
            // QEMU would store them in plaintext: never in an encrypted image.
            return Err(self.at(ErrorKind::Unsupported(
                "compression and encryption are not supported at the same time".into(),
            )));
        }
        self.prepare()?;
        for (gc, c) in clusters {
            self.check_range(gc * self.cs, self.cs)?;
            match c {
                Compressed::Plain(data) => self.write_in_cluster(*gc, 0, data)?,
                Compressed::Stream(bytes) => {
                    let off = self.place_compressed(bytes.len() as u64)?;
                    self.data_written.set(true);
                    pwrite(&self.file, bytes, off).map_err(|e| self.at(e.into()))?;
                    let (table, e) = self.entry(*gc)?;
                    self.release(&e);
                    let word = CompressedDescriptor::encode(
                        off,
                        bytes.len() as u64,
                        self.fmt.cluster_bits,
                    );
                    self.set_entry(table, *gc, L2Entry { word, bitmap: 0 });
                }
            }
            self.maybe_flush()?;
        }
        Ok(())
    }

    /// Finds room for `len` compressed bytes, packing streams back to back into host clusters,
    /// and takes one reference on every host cluster the stream touches.
    fn place_compressed(&mut self, len: u64) -> Result<u64> {
        let cs = self.cs;
        if let Some(pos) = self.compress_pos.take() {
            let (first, last) = (pos / cs, (pos + len - 1) / cs);
            // The cluster holding `pos` holds earlier streams of this flush interval (nothing
            // is freed before the next flush, which forgets `pos`); it needs room for one more
            // reference, and the following clusters must be free.
            let max = self.refs.format().max_value();
            let mut ok = self.refs.get(&self.file, first).map_err(|k| self.at(k))? < max;
            let mut claimed = Vec::new();
            for c in first + 1..=last {
                if !ok {
                    break;
                }
                ok = self.refs.claim(&self.file, c).map_err(|k| self.at(k))?;
                if ok {
                    claimed.push(c);
                }
            }
            if ok {
                self.refs
                    .add(&self.file, first, 1)
                    .map_err(|k| self.at(k))?;
                self.compress_pos = Some(pos + len).filter(|e| e % cs != 0);
                return Ok(pos);
            }
            for c in claimed {
                self.refs.set(&self.file, c, 0).map_err(|k| self.at(k))?;
            }
        }
        let start = self
            .refs
            .alloc(&self.file, len.div_ceil(cs))
            .map_err(|k| self.at(k))?;
        self.compress_pos = Some(start + len).filter(|e| e % cs != 0);
        Ok(start)
    }
}

/// A cluster prepared for [`Writer::write_compressed`].
pub enum Compressed {
    /// The compressed stream (shorter than a cluster).
    Stream(Vec<u8>),
    /// Did not compress: stored as plain data.
    Plain(Vec<u8>),
}

/// Compresses one cluster for [`Writer::write_compressed`]: the stream, or the data itself
/// where compressing saves nothing (QEMU stores such clusters plainly too).
pub fn compress_cluster(kind: CompressionType, data: &[u8]) -> Compressed {
    match kind.compress(data) {
        Some(stream) => Compressed::Stream(stream),
        None => Compressed::Plain(data.to_vec()),
    }
}
