//! Header edits in place: the backing file name and format (`qemu-img rebase -u`).
//!
//! The header cluster is rebuilt whole (header, every extension kept, the new name after
//! them) and written with one write at offset 0; the header and its extensions live in the
//! first few hundred bytes, so the change lands in one sector-sized write.

use super::Writer;
use crate::qcow2::create::header_cluster;
use crate::qcow2::error::{ErrorKind, Result};
use crate::qcow2::fault::pwrite;
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
        self.prepare()?;
        self.flush()?;
        let mut ext = self.ext.clone();
        ext.backing_format = backing.and_then(|(_, f)| f).map(|f| f.name().to_string());
        let mut h = self.header.clone();
        let cluster0 = header_cluster(
            &mut h,
            &ext.to_records(),
            backing.map(|(n, _)| n.as_bytes()),
        )
        .map_err(|k| self.at(k))?;
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
}
