//! Uploads of backup files: whole objects appear only when complete, and every byte the
//! store keeps was checked by the store against a CRC-32 we computed from the local file.
//!
//! Files up to one part go up in one `PUT`; larger ones in a multipart upload whose parts
//! (16 MiB, larger for files beyond 160 GiB so 10,000 parts suffice) are read, checksummed and
//! sent by several workers at once, each part carrying `x-amz-checksum-crc32`, which the store
//! verifies before it accepts the part. Before the upload is completed, the caller sees the
//! parts' CRCs (to compare them with the backup's manifest). Nothing half-written is ever
//! visible under the key: an unfinished upload is not an object. One the store or the checks
//! refuse is aborted; one cut off by the network or a kill is resumed by the next push
//! ([`super::resume`]). The object's
//! CRC-32 is kept as user metadata ([`CRC_META`]) so a later push can tell an uploaded file
//! from another one of the same size without downloading it.

use super::client::{crc32_value, Client, Failure, Op, CRC_META};
use super::error::S3Error;
use super::resume::{self, Held, Record};
use rayon::prelude::*;
use rusty_s3::actions::{AbortMultipartUpload, CreateMultipartUpload, S3Action, UploadPart};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The part size for files up to [`PART`] × [`MAX_PARTS`].
pub const PART: u64 = 16 << 20;
const MAX_PARTS: u64 = 10_000;
/// Parts in flight at once (each holds one part in memory).
const WORKERS: usize = 8;

/// The part size for a file of `size` bytes: [`PART`], or a multiple of 64 MiB (a manifest
/// extent) when the file needs more than [`MAX_PARTS`] parts of that size.
pub fn part_size(size: u64) -> u64 {
    if size <= PART * MAX_PARTS {
        return PART;
    }
    let unit = 64 << 20;
    size.div_ceil(MAX_PARTS).div_ceil(unit) * unit
}

/// Checks the CRC-32 of each part (parts of the given size, the last maybe short) before the
/// upload is completed; an error aborts it.
pub type PartCheck<'a> = &'a (dyn Fn(u64, &[u32]) -> Result<(), String> + Sync);

fn read_part(file: &File, buf: &mut [u8], offset: u64, what: &str) -> Result<(), S3Error> {
    file.read_exact_at(buf, offset)
        .map_err(|e| S3Error::Transport(what.to_string(), format!("reading the local file: {e}")))
}

/// Told the size of each piece of the file once the store holds it (for progress bars).
pub type Sent<'a> = &'a (dyn Fn(u64) + Sync);

/// A local file to upload: its `size` bytes and their CRC-32.
#[derive(Clone, Copy)]
pub struct Source<'a> {
    pub file: &'a File,
    pub size: u64,
    pub crc: u32,
}

/// Uploads `source` as `key`, recording its CRC-32 as metadata. A multipart upload is
/// recorded in `journal` while it runs: if it is cut off, the next call for the same file
/// resumes it (see [`super::resume`]).
pub fn upload(
    client: &Client,
    key: &str,
    source: Source,
    check: PartCheck,
    sent: Sent,
    journal: &Path,
) -> Result<(), S3Error> {
    let Source { file, size, crc } = source;
    let what = client.url(key);
    let meta = [(CRC_META, format!("{crc:08x}"))];
    let part = part_size(size);
    if size <= part {
        let mut body = vec![0u8; size as usize];
        read_part(file, &mut body, 0, &what)?;
        check(part, &[crc32fast::hash(&body)]).map_err(|p| S3Error::Reply(what.clone(), p))?;
        client.put(key, &body, &meta)?;
        sent(size);
        return Ok(());
    }
    let mtime = file
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let mut record = Record {
        key: key.to_string(),
        upload_id: String::new(),
        part,
        size,
        mtime,
    };
    let mut held = Held::new();
    match Record::read(journal) {
        Some(old) if old.same_file(&record) => {
            if let Some(parts) = resume::held_parts(client, key, &old.upload_id)? {
                record.upload_id = old.upload_id;
                held = parts;
            }
        }
        // An upload of another file (or of this one before it changed) is of no use.
        Some(old) => abort(client, &old.key, &old.upload_id),
        None => {}
    }
    if record.upload_id.is_empty() {
        record.upload_id = create(client, key, &meta)?;
        if let Err(e) = record.write(journal) {
            tracing::warn!(
                "cannot record the upload in {} ({e}): an interrupted upload will start over",
                journal.display()
            );
        }
    } else {
        tracing::info!(
            "Resuming the upload of {what}: {} of {} parts are in the store already",
            held.len(),
            size.div_ceil(part)
        );
    }
    let result = send_parts(client, &record, file, &held, (check, sent))
        .and_then(|etags| complete(client, key, &record.upload_id, &etags));
    match &result {
        Ok(()) => resume::forget(journal),
        // Unreachable stores and broken connections: the parts sent so far stay for the next
        // push to resume from.
        Err(S3Error::Transport(..)) => {}
        Err(e) if e.status().is_some_and(|s| s >= 500 || s == 429 || s == 408) => {}
        // Refused (a damaged local file, a part the store holds otherwise): given up.
        Err(e) => {
            abort(client, key, &record.upload_id);
            resume::forget(journal);
            // The store refused the parts it held for us: one fresh upload settles it.
            if !held.is_empty() && matches!(e, S3Error::Status { .. }) {
                tracing::warn!("{e}; starting the upload over");
                return upload(client, key, source, check, sent, journal);
            }
        }
    }
    result
}

/// Aborts an upload, best effort: the store would otherwise keep its parts until its own
/// cleanup.
fn abort(client: &Client, key: &str, upload_id: &str) {
    let action =
        AbortMultipartUpload::new(&client.bucket, Some(&client.credentials), key, upload_id);
    let _ = client.request(Op::Delete, &action).call();
}

fn create(client: &Client, key: &str, meta: &[(&str, String)]) -> Result<String, S3Error> {
    let what = client.url(key);
    let mut action = CreateMultipartUpload::new(&client.bucket, Some(&client.credentials), key);
    action
        .headers_mut()
        .insert("x-amz-checksum-algorithm", "CRC32");
    for (k, v) in meta {
        action.headers_mut().insert(*k, v.clone());
    }
    client.call(|| {
        let mut req = client
            .request(Op::Post, &action)
            .set("x-amz-checksum-algorithm", "CRC32");
        for (k, v) in meta {
            req = req.set(k, v);
        }
        let resp = req.call().map_err(|e| client.failure(&what, e))?;
        let body = Client::text(resp, 1 << 20, &what)?;
        CreateMultipartUpload::parse_response(&body)
            .map(|r| r.upload_id().to_string())
            .map_err(|e| Failure::Fatal(S3Error::Reply(what.clone(), e.to_string())))
    })
}

/// Sends every part the store does not hold already (`held`: part number → ETag and size);
/// returns (ETag, CRC-32 value) by part number. Held parts are read and checksummed too: the
/// completion names their CRCs, which the store checks against what it holds.
fn send_parts(
    client: &Client,
    upload: &Record,
    file: &File,
    held: &Held,
    (check, sent): (PartCheck, Sent),
) -> Result<Vec<(String, String)>, S3Error> {
    let (key, upload_id, size, part) = (&upload.key, &upload.upload_id, upload.size, upload.part);
    let what = client.url(key);
    let count = size.div_ceil(part);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(WORKERS)
        .build()
        .map_err(|e| S3Error::Transport(what.clone(), e.to_string()))?;
    let sent: Vec<(String, u32)> = pool.install(|| {
        (0..count)
            .into_par_iter()
            .map(|i| {
                let start = i * part;
                let mut buf = vec![0u8; part.min(size - start) as usize];
                read_part(file, &mut buf, start, &what)?;
                let crc = crc32fast::hash(&buf);
                let value = crc32_value(crc);
                let number = u16::try_from(i + 1).expect("at most 10,000 parts");
                if let Some((etag, _)) = held.get(&number).filter(|(_, n)| *n == buf.len() as u64) {
                    sent(buf.len() as u64);
                    return Ok((etag.clone(), crc));
                }
                let mut action = UploadPart::new(
                    &client.bucket,
                    Some(&client.credentials),
                    key,
                    number,
                    upload_id,
                );
                action
                    .headers_mut()
                    .insert("x-amz-checksum-crc32", value.clone());
                let etag = client.call(|| {
                    let resp = client
                        .request(Op::Put, &action)
                        .set("x-amz-checksum-crc32", &value)
                        .send_bytes(&buf)
                        .map_err(|e| client.failure(&what, e))?;
                    resp.header("etag").map(str::to_string).ok_or_else(|| {
                        Failure::Fatal(S3Error::Reply(what.clone(), "part without ETag".into()))
                    })
                })?;
                client.traffic.add_sent(buf.len() as u64);
                sent(buf.len() as u64);
                Ok((etag, crc))
            })
            .collect::<Result<_, S3Error>>()
    })?;
    let crcs: Vec<u32> = sent.iter().map(|(_, c)| *c).collect();
    check(part, &crcs).map_err(|p| S3Error::Reply(what.clone(), p))?;
    Ok(sent
        .into_iter()
        .map(|(etag, crc)| (etag, crc32_value(crc)))
        .collect())
}

/// Completes the upload. The request body lists each part's CRC-32 too (stores that keep
/// per-part checksums, AWS among them, require it once the upload declared CRC32).
fn complete(
    client: &Client,
    key: &str,
    upload_id: &str,
    parts: &[(String, String)],
) -> Result<(), S3Error> {
    let what = client.url(key);
    let action = rusty_s3::actions::CompleteMultipartUpload::new(
        &client.bucket,
        Some(&client.credentials),
        key,
        upload_id,
        std::iter::empty(),
    );
    let mut body = String::from("<CompleteMultipartUpload>");
    for (i, (etag, crc)) in parts.iter().enumerate() {
        body += &format!(
            "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag><ChecksumCRC32>{crc}</ChecksumCRC32></Part>",
            i + 1,
            etag.replace('&', "&amp;").replace('<', "&lt;")
        );
    }
    body += "</CompleteMultipartUpload>";
    client.call(|| {
        let resp = client
            .request(Op::Post, &action)
            .send_string(&body)
            .map_err(|e| client.failure(&what, e))?;
        let answer = Client::text(resp, 1 << 20, &what)?;
        // S3 may report a failed completion inside a 200 answer.
        if answer.contains("<Error>") {
            return Err(Failure::Retry(S3Error::Reply(what.clone(), answer)));
        }
        Ok(())
    })
}

/// The CRC-32 of `size` bytes of `file`, read in parts.
pub fn file_crc(file: &File, size: u64) -> std::io::Result<u32> {
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; (4 << 20).min(size.max(1)) as usize];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], pos)?;
        h.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3::client::crc32_header;

    #[test]
    fn part_sizes_keep_within_ten_thousand_parts_and_align_to_manifest_extents() {
        assert_eq!(part_size(1), PART);
        assert_eq!(part_size(PART * MAX_PARTS), PART);
        let big = 4u64 << 40;
        let p = part_size(big);
        assert!(big.div_ceil(p) <= MAX_PARTS && p % (64 << 20) == 0);
        assert_eq!(crc32_header(b"abc"), crc32_value(crc32fast::hash(b"abc")));
    }
}
