//! Header edits in place: the backing file name and format (`qemu-img rebase -u`), and
//! growing the virtual size (`qemu-img resize`), for chains whose disk grew between backups.
//!
//! The header cluster is rebuilt whole (header, every extension kept, the new name after
//! them) and written with one write at offset 0; the header and its extensions live in the
//! first few hundred bytes, so the change lands in one sector-sized write.

use super::Writer;
use crate::qcow2::create::header_cluster;
use crate::qcow2::error::{ErrorKind, Result};
use crate::qcow2::fault::pwrite;
use crate::qcow2::header::MAX_L1_BYTES;
use crate::qcow2::l1::L1Entry;
use crate::qcow2::Format;

impl Writer {
    /// Sets (or with `None` removes) the backing file name and its format. The name is stored
    /// as given; relative names are resolved against the image's directory when read.
    pub fn set_backing(&mut self, backing: Option<(&str, Option<Format>)>) -> Result<()> {
        if let Some((name, _)) = backing {
            if name.is_empty() || name.len() > crate::qcow2::header::MAX_BACKING_NAME as usize {
                return Err(self.at(ErrorKind::Unsupported(
                    "backing file name must be 1 to 1023 bytes".into(),
                )));
            }
            if self.header.data_file_raw() {
                return Err(self.at(ErrorKind::Unsupported(
                    "an image with a raw data file cannot have a backing file".into(),
                )));
            }
        }
        // The new backing file must open before anything is written.
        let fmt_name = backing.and_then(|(_, f)| f).map(|f| f.name());
        let new_backing = match backing {
            Some((name, _)) => Some(super::open_backing(
                &self.path,
                std::ffi::OsStr::new(name),
                fmt_name,
            )?),
            None => None,
        };
        // The new header cluster must fit before anything is written (bitmap flags included).
        let mut ext = self.ext.clone();
        ext.backing_format = backing.and_then(|(_, f)| f).map(|f| f.name().to_string());
        let mut h = self.header.clone();
        let cluster0 = header_cluster(
            &mut h,
            &ext.to_records(),
            backing.map(|(n, _)| n.as_bytes()),
        )
        .map_err(|k| self.at(k))?;
        self.prepare()?;
        self.flush()?;
        // prepare may have cleared unknown autoclear bits: the header written carries that.
        h.autoclear_features = self.header.autoclear_features;
        // Only the used part: header, extensions, name.
        let used = match backing {
            Some((n, _)) => h.backing_file_offset as usize + n.len(),
            None => cluster0.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1),
        };
        let end = used.div_ceil(512) * 512;
        pwrite(&self.file, &cluster0[..end.min(cluster0.len())], 0)
            .map_err(|e| self.at(e.into()))?;
        self.sync()?;
        self.header = h;
        self.ext = ext;
        self.backing = new_backing;
        Ok(())
    }

    /// Grows the virtual size to `size`. When the L1 table must grow, a larger copy is written
    /// to new clusters first and made durable; the header then switches to it (size, L1
    /// offset and length) in one sector-sized write; the old table is released last. A crash
    /// leaves either the old or the new size, at worst with leaked clusters.
    pub fn grow(&mut self, size: u64) -> Result<()> {
        if size < self.header.size {
            return Err(self.at(ErrorKind::Unsupported(format!(
                "shrinking from {} to {size} bytes is not supported",
                self.header.size
            ))));
        }
        if size == self.header.size {
            return Ok(());
        }
        let needed = self.header.l1_entries_needed(size);
        if needed * 8 > MAX_L1_BYTES {
            return Err(self.at(ErrorKind::Unsupported(format!(
                "{size} bytes need an L1 table larger than QEMU's limit of {MAX_L1_BYTES} bytes"
            ))));
        }
        self.prepare()?;
        self.flush()?;
        let mut h = self.header.clone();
        h.size = size;
        let old = (h.l1_table_offset, h.l1_size as u64);
        if needed > old.1 {
            let clusters = (needed * 8).div_ceil(self.cs);
            let offset = self
                .refs
                .alloc(&self.file, clusters)
                .map_err(|k| self.at(k))?;
            // The new table's refcounts (and a relocated refcount table) become durable.
            self.flush()?;
            let mut table = vec![0u8; (clusters * self.cs) as usize];
            for (i, e) in self.l1.iter().enumerate() {
                table[i * 8..i * 8 + 8].copy_from_slice(&e.0.to_be_bytes());
            }
            pwrite(&self.file, &table, offset).map_err(|e| self.at(e.into()))?;
            self.sync()?;
            h.l1_table_offset = offset;
            h.l1_size = needed as u32;
            h.refcount_table_offset = self.header.refcount_table_offset;
            h.refcount_table_clusters = self.header.refcount_table_clusters;
            self.l1.resize(needed as usize, L1Entry(0));
            if old.0 != 0 && old.1 > 0 {
                self.frees
                    .push((old.0 / self.cs, (old.1 * 8).div_ceil(self.cs)));
            }
        }
        self.header = h;
        self.write_header()?;
        self.sync()?;
        self.flush()
    }
}
