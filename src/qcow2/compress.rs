//! Decompression of compressed clusters (raw deflate or zstd).
//!
//! Both decoders stop as soon as one cluster of output is produced, so a hostile stream cannot
//! inflate beyond the cluster ("compression bomb"), and both must make progress on every step
//! so a stream cannot loop. The input is an upper bound read from the file: it may end with
//! padding or with the start of the next cluster's stream, which is ignored, as QEMU does.

use super::header::CompressionType;
use flate2::{Decompress, FlushDecompress, Status};

/// Decompresses one cluster from `input` into `out` (exactly one cluster long).
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match kind {
        CompressionType::Zlib => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let mut d = Decompress::new(false);
    match d.decompress(input, out, FlushDecompress::Finish) {
        Ok(Status::StreamEnd) | Ok(Status::BufError) | Ok(Status::Ok)
            if d.total_out() == out.len() as u64 =>
        {
            Ok(())
        }
        Ok(_) => Err(format!(
            "deflate stream ends after {} of {} bytes",
            d.total_out(),
            out.len()
        )),
        Err(e) => Err(format!("invalid deflate stream: {e}")),
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let mut dec = Decoder::new().map_err(|e| format!("zstd: {e}"))?;
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    let mut hint = 1;
    while outb.pos() < outb.capacity() {
        let (in_before, out_before) = (inb.pos, outb.pos());
        hint = dec
            .run(&mut inb, &mut outb)
            .map_err(|e| format!("invalid zstd stream: {e}"))?;
        if inb.pos <= in_before && outb.pos() <= out_before {
            return Err(format!(
                "zstd stream ends after {} of {} bytes",
                outb.pos(),
                outb.capacity()
            ));
        }
    }
    if hint > 0 {
        return Err("zstd frame is longer than one cluster".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

    fn deflate_raw(data: &[u8]) -> Vec<u8> {
        let mut c = Compress::new(Compression::default(), false);
        let mut out = Vec::with_capacity(data.len() + 64);
        c.compress_vec(data, &mut out, FlushCompress::Finish)
            .unwrap();
        out
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i / 7 % 251) as u8).collect()
    }

    #[test]
    fn zlib_with_trailing_garbage() {
        let data = pattern(65536);
        let mut input = deflate_raw(&data);
        input.extend_from_slice(&[0xaa; 300]);
        let mut out = vec![0; 65536];
        decompress(CompressionType::Zlib, &input, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn zstd_with_sector_padding() {
        let data = pattern(65536);
        let mut input = zstd::bulk::compress(&data, 3).unwrap();
        input.resize(input.len().div_ceil(512) * 512, 0);
        let mut out = vec![0; 65536];
        decompress(CompressionType::Zstd, &input, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn zstd_two_frames() {
        let data = pattern(8192);
        let mut input = zstd::bulk::compress(&data[..4096], 1).unwrap();
        input.extend(zstd::bulk::compress(&data[4096..], 1).unwrap());
        let mut out = vec![0; 8192];
        decompress(CompressionType::Zstd, &input, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn short_or_oversized_streams_fail() {
        let mut out = vec![0; 65536];
        let short = deflate_raw(&pattern(1000));
        assert!(decompress(CompressionType::Zlib, &short, &mut out).is_err());
        let short = zstd::bulk::compress(&pattern(1000), 1).unwrap();
        assert!(decompress(CompressionType::Zstd, &short, &mut out).is_err());
        // A bomb: 1 MiB of zeros must not inflate beyond the 64 KiB cluster.
        let bomb = zstd::bulk::compress(&vec![0; 1 << 20], 1).unwrap();
        assert!(decompress(CompressionType::Zstd, &bomb, &mut out).is_err());
        let bomb = deflate_raw(&vec![0; 1 << 20]);
        decompress(CompressionType::Zlib, &bomb, &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 0));
        assert!(decompress(CompressionType::Zlib, &[0xff; 64], &mut out).is_err());
        assert!(decompress(CompressionType::Zstd, &[0xff; 64], &mut out).is_err());
    }
}
