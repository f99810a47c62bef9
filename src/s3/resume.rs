//! Resuming a multipart upload that a previous push left unfinished.
//!
//! A multi-GiB backup file takes minutes to upload; a push killed or cut off half-way should
//! not send the parts the store already holds again. When a multipart upload starts, its id is
//! recorded in a small journal file beside the local file (a dot file: folder scans and pushes
//! skip it). The next push of the same file (same key, size, part size and modification time)
//! asks the store which parts it holds (`ListParts`) and sends only the others. Nothing is
//! trusted blindly: every part is still read and checksummed locally, and the completion lists
//! each part's CRC-32, which the store compares with what it stored for that part (AWS and
//! Garage refuse a mismatch), so a resumed object holds exactly the local file's bytes.

use super::client::{Client, Failure, Op};
use super::error::S3Error;
use rusty_s3::actions::ListParts;
use std::collections::HashMap;
use std::path::Path;

/// What identifies an upload in progress, as recorded in the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: String,
    pub upload_id: String,
    pub part: u64,
    pub size: u64,
    /// The local file's modification time (nanoseconds since the epoch).
    pub mtime: u128,
}

const MAGIC: &str = "qmpbackup multipart upload";

impl Record {
    fn to_text(&self) -> String {
        format!(
            "{MAGIC}\nkey={}\nupload={}\npart={}\nsize={}\nmtime={}\n",
            self.key, self.upload_id, self.part, self.size, self.mtime
        )
    }

    fn parse(text: &str) -> Option<Record> {
        let mut lines = text.lines();
        if lines.next()? != MAGIC {
            return None;
        }
        let fields: HashMap<&str, &str> = lines.filter_map(|l| l.split_once('=')).collect();
        Some(Record {
            key: fields.get("key")?.to_string(),
            upload_id: fields.get("upload")?.to_string(),
            part: fields.get("part")?.parse().ok()?,
            size: fields.get("size")?.parse().ok()?,
            mtime: fields.get("mtime")?.parse().ok()?,
        })
    }

    /// The journal's record, if there is a readable one.
    pub fn read(journal: &Path) -> Option<Record> {
        // A journal is a few hundred bytes; anything larger is not ours.
        let meta = std::fs::metadata(journal).ok()?;
        if meta.len() > 64 << 10 {
            return None;
        }
        Record::parse(&std::fs::read_to_string(journal).ok()?)
    }

    /// Records the upload (atomically: a torn journal would only cost the resumption).
    pub fn write(&self, journal: &Path) -> std::io::Result<()> {
        let tmp = journal.with_extension("tmp");
        std::fs::write(&tmp, self.to_text())?;
        std::fs::rename(&tmp, journal)
    }

    /// Whether this record describes the same upload as `other` except for its id.
    pub fn same_file(&self, other: &Record) -> bool {
        (&self.key, self.part, self.size, self.mtime)
            == (&other.key, other.part, other.size, other.mtime)
    }
}

/// Removes the journal (the upload completed or was given up).
pub fn forget(journal: &Path) {
    let _ = std::fs::remove_file(journal);
}

/// Parts of an upload the store holds: part number → (ETag, size).
pub type Held = HashMap<u16, (String, u64)>;

/// The parts the store holds for upload `upload_id` of `key`; `None` when the store no longer
/// knows the upload (completed, aborted or expired).
pub fn held_parts(client: &Client, key: &str, upload_id: &str) -> Result<Option<Held>, S3Error> {
    let what = client.url(key);
    let mut held = HashMap::new();
    let mut marker: Option<u16> = None;
    loop {
        let mut action = ListParts::new(&client.bucket, Some(&client.credentials), key, upload_id);
        if let Some(m) = marker {
            action.set_part_number_marker(m);
        }
        let page = client.call(|| {
            let resp = match client.request(Op::List, &action).call() {
                Ok(r) => r,
                Err(ureq::Error::Status(404, _)) => return Ok(None),
                Err(e) => return Err(client.failure(&what, e)),
            };
            let body = Client::text(resp, 16 << 20, &what)?;
            ListParts::parse_response(&body)
                .map(Some)
                .map_err(|e| Failure::Fatal(S3Error::Reply(what.clone(), e.to_string())))
        })?;
        let Some(page) = page else { return Ok(None) };
        for p in page.parts {
            held.insert(p.number, (p.etag, p.size));
        }
        match page.next_part_number_marker {
            // A marker that does not advance would list forever.
            Some(m) if marker.is_none_or(|old| m > old) => marker = Some(m),
            _ => return Ok(Some(held)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_foreign_text_is_ignored() {
        let r = Record {
            key: "p/disk/FULL-1-disk.qcow2".into(),
            upload_id: "abc=/+".into(),
            part: 16 << 20,
            size: 1 << 30,
            mtime: 1_700_000_000_123_456_789,
        };
        assert_eq!(Record::parse(&r.to_text()), Some(r.clone()));
        assert_eq!(Record::parse("something else\nkey=x\n"), None);
        assert_eq!(Record::parse(&r.to_text().replace("size=", "size=x")), None);
        let other = Record {
            upload_id: "zzz".into(),
            ..r.clone()
        };
        assert!(r.same_file(&other));
        assert!(!r.same_file(&Record { size: 1, ..other }));
    }
}
