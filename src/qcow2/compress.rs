//! Compression types of compressed clusters: everything one type is — its header byte (104),
//! its name, whether images using it need the incompatible "compression type" feature bit,
//! and how it encodes and decodes a cluster — lives here, so a new type is a new variant and
//! a new [`Codec`] in this file.
//!
//! Both decoders stop as soon as one cluster of output is produced, so a hostile stream cannot
//! inflate beyond the cluster ("compression bomb"), and both must make progress on every step
//! so a stream cannot loop. The input is an upper bound read from the file: it may end with
//! padding or with the start of the next cluster's stream, which is ignored, as QEMU does.

use flate2::{Decompress, FlushDecompress, Status};

/// How compressed clusters are encoded (header byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompressionType {
    /// Raw deflate; QEMU calls it "zlib". The default, and the only type of version 2.
    #[default]
    Zlib,
    Zstd,
}

/// Encoding and decoding of one cluster.
trait Codec: Sync {
    /// The encoded cluster, if it fits in fewer than `limit` bytes.
    fn compress(&self, data: &[u8], limit: usize) -> Option<Vec<u8>>;
    /// Decodes exactly `out.len()` bytes from the start of `input`.
    fn decompress(&self, input: &[u8], out: &mut [u8]) -> Result<(), String>;
}

struct Deflate;
struct Zstd;

impl CompressionType {
    pub const ALL: [CompressionType; 2] = [CompressionType::Zlib, CompressionType::Zstd];

    /// As QEMU and the command lines name it.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }

    /// The names of all types, for help texts and parsers.
    pub fn names() -> [&'static str; 2] {
        Self::ALL.map(Self::name)
    }

    /// The value of header byte 104.
    pub fn header_byte(self) -> u8 {
        match self {
            CompressionType::Zlib => 0,
            CompressionType::Zstd => 1,
        }
    }

    pub fn from_header_byte(byte: u8) -> Option<CompressionType> {
        Self::ALL.into_iter().find(|t| t.header_byte() == byte)
    }

    /// Whether an image using it sets the incompatible "compression type" bit (every type but
    /// the default does, so readers that only know deflate refuse the image).
    pub fn needs_feature_bit(self) -> bool {
        self != CompressionType::default()
    }

    fn codec(self) -> &'static dyn Codec {
        match self {
            CompressionType::Zlib => &Deflate,
            CompressionType::Zstd => &Zstd,
        }
    }

    /// Decompresses one cluster from `input` into `out` (exactly one cluster long).
    pub fn decompress(self, input: &[u8], out: &mut [u8]) -> Result<(), String> {
        self.codec().decompress(input, out)
    }

    /// Compresses one cluster the way QEMU can read it; `None` unless it saves at least one
    /// byte (QEMU then stores the cluster plainly).
    pub fn compress(self, data: &[u8]) -> Option<Vec<u8>> {
        let limit = data.len().saturating_sub(1);
        self.codec()
            .compress(data, limit)
            .filter(|o| o.len() < limit)
    }
}

impl std::str::FromStr for CompressionType {
    type Err = String;

    fn from_str(s: &str) -> Result<CompressionType, String> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                format!(
                    "compression type must be one of {}, not '{s}'",
                    Self::names().join(", ")
                )
            })
    }
}

impl Codec for Deflate {
    fn compress(&self, data: &[u8], limit: usize) -> Option<Vec<u8>> {
        use flate2::{Compress, Compression, FlushCompress};
        // A 4 KiB window, as QEMU writes them.
        let mut c = Compress::new_with_window_bits(Compression::default(), false, 12);
        let mut out = Vec::with_capacity(limit);
        match c.compress_vec(data, &mut out, FlushCompress::Finish) {
            Ok(Status::StreamEnd) => Some(out),
            _ => None,
        }
    }

    fn decompress(&self, input: &[u8], out: &mut [u8]) -> Result<(), String> {
        inflate(input, out)
    }
}

impl Codec for Zstd {
    fn compress(&self, data: &[u8], _limit: usize) -> Option<Vec<u8>> {
        // One frame, as QEMU writes them.
        zstd::bulk::compress(data, 0).ok()
    }

    fn decompress(&self, input: &[u8], out: &mut [u8]) -> Result<(), String> {
        unzstd(input, out)
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

    #[test]
    fn every_type_round_trips_and_parses_by_name() {
        let data = pattern(65536);
        for t in CompressionType::ALL {
            let c = t.compress(&data).unwrap();
            let mut out = vec![0; 65536];
            t.decompress(&c, &mut out).unwrap();
            assert_eq!(out, data);
            assert_eq!(t.name().parse::<CompressionType>(), Ok(t));
            assert_eq!(CompressionType::from_header_byte(t.header_byte()), Some(t));
            assert_eq!(t.needs_feature_bit(), t != CompressionType::Zlib);
        }
        assert!(
            CompressionType::Zstd.compress(&[7; 8]).is_none(),
            "no gain, no stream"
        );
        assert!("lz4"
            .parse::<CompressionType>()
            .unwrap_err()
            .contains("zlib, zstd"));
    }

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

    /// Streams as QEMU may leave them: followed by garbage (the next cluster's stream), or
    /// padded to whole sectors.
    #[test]
    fn streams_with_trailing_bytes_decode() {
        let data = pattern(65536);
        let mut zlib = deflate_raw(&data);
        zlib.extend_from_slice(&[0xaa; 300]);
        let mut zstd = zstd::bulk::compress(&data, 3).unwrap();
        zstd.resize(zstd.len().div_ceil(512) * 512, 0);
        for (t, input) in [(CompressionType::Zlib, zlib), (CompressionType::Zstd, zstd)] {
            let mut out = vec![0; 65536];
            t.decompress(&input, &mut out).unwrap();
            assert_eq!(out, data, "{t:?}");
        }
    }

    #[test]
    fn zstd_two_frames() {
        let data = pattern(8192);
        let mut input = zstd::bulk::compress(&data[..4096], 1).unwrap();
        input.extend(zstd::bulk::compress(&data[4096..], 1).unwrap());
        let mut out = vec![0; 8192];
        CompressionType::Zstd.decompress(&input, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn short_or_oversized_streams_fail() {
        let mut out = vec![0; 65536];
        let short = deflate_raw(&pattern(1000));
        assert!(CompressionType::Zlib.decompress(&short, &mut out).is_err());
        let short = zstd::bulk::compress(&pattern(1000), 1).unwrap();
        assert!(CompressionType::Zstd.decompress(&short, &mut out).is_err());
        // A bomb: 1 MiB of zeros must not inflate beyond the 64 KiB cluster.
        let bomb = zstd::bulk::compress(&vec![0; 1 << 20], 1).unwrap();
        assert!(CompressionType::Zstd.decompress(&bomb, &mut out).is_err());
        let bomb = deflate_raw(&vec![0; 1 << 20]);
        CompressionType::Zlib.decompress(&bomb, &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 0));
        assert!(CompressionType::Zlib
            .decompress(&[0xff; 64], &mut out)
            .is_err());
        assert!(CompressionType::Zstd
            .decompress(&[0xff; 64], &mut out)
            .is_err());
    }
}
