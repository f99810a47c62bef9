//! qemu-img's spelling of image options (`-o cluster_size=64k,compat=0.10,...`) and sizes
//! (`64M`, `2T`), so `qmprestore create` accepts the same command lines.

use crate::qcow2::create::CreateOptions;
use crate::qcow2::crypto::Keying;
use crate::qcow2::Format;

/// Parses `512`, `64k`, `1.5G`, `2T` (binary units, as qemu-img).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                'p' => 50,
                'e' => 60,
                _ => return Err(format!("unknown size suffix in '{s}'")),
            };
            (&s[..i], 1u64 << shift)
        }
        _ => (s, 1),
    };
    let v: f64 = num.parse().map_err(|_| format!("invalid size '{s}'"))?;
    let bytes = v * mult as f64;
    if !(0.0..1.8e19).contains(&bytes) || bytes.fract() != 0.0 {
        return Err(format!("invalid size '{s}'"));
    }
    Ok(bytes as u64)
}

fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{key} takes on or off, not '{v}'")),
    }
}

/// Applies a comma-separated `-o` list to `opts`.
pub fn apply(opts: &mut CreateOptions, list: &str) -> Result<(), String> {
    for item in list.split(',').filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("option '{item}' needs a value (key=value)"))?;
        match k {
            "size" => opts.size = parse_size(v)?,
            "cluster_size" => opts.cluster_size = parse_size(v)?,
            "compat" => {
                opts.version = match v {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(format!("compat must be 0.10 or 1.1, not '{v}'")),
                }
            }
            "refcount_bits" => {
                opts.refcount_bits = v
                    .parse()
                    .map_err(|_| format!("invalid refcount_bits '{v}'"))?
            }
            "lazy_refcounts" => opts.lazy_refcounts = on_off(k, v)?,
            "extended_l2" => opts.extended_l2 = on_off(k, v)?,
            "compression_type" => opts.compression = v.parse()?,
            "backing_file" => {
                let fmt = opts.backing.take().and_then(|b| b.1);
                opts.backing = Some((v.to_string(), fmt));
            }
            "backing_fmt" => {
                let f = Format::from_name(v)
                    .ok_or_else(|| format!("backing format must be qcow2 or raw, not '{v}'"))?;
                let name = opts.backing.take().map(|b| b.0).unwrap_or_default();
                opts.backing = Some((name, Some(f)));
            }
            "data_file" => {
                let raw = opts.data_file.take().is_some_and(|d| d.1);
                opts.data_file = Some((v.to_string(), raw));
            }
            "data_file_raw" => {
                let raw = on_off(k, v)?;
                match &mut opts.data_file {
                    Some(d) => d.1 = raw,
                    None if raw => opts.data_file = Some((String::new(), true)),
                    None => {}
                }
            }
            "encrypt.format" => match v {
                "luks" => {
                    opts.encrypt
                        .get_or_insert_with(|| Keying::Fresh(Default::default()));
                }
                "aes" => return Err(
                    "legacy AES encryption is broken and read only here: use encrypt.format=luks"
                        .into(),
                ),
                _ => return Err(format!("unknown encryption format '{v}'")),
            },
            "encryption" if on_off(k, v)? => {
                return Err("encryption=on is legacy AES: use encrypt.format=luks".into())
            }
            "encryption" => {}
            _ => match k.strip_prefix("encrypt.") {
                Some(key) => {
                    let fresh = opts
                        .encrypt
                        .get_or_insert_with(|| Keying::Fresh(Default::default()));
                    let Keying::Fresh(request) = fresh else {
                        return Err(format!("option '{k}' does not apply to this output"));
                    };
                    if !request.set(key, v)? {
                        return Err(format!("unknown option '{k}'"));
                    }
                }
                None => return Err(format!("unknown option '{k}'")),
            },
        }
    }
    if matches!(&opts.backing, Some((n, _)) if n.is_empty()) {
        return Err("backing_fmt needs backing_file".into());
    }
    if matches!(&opts.data_file, Some((n, _)) if n.is_empty()) {
        return Err("data_file_raw needs data_file".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert!(parse_size("1x").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("0.3k").is_err());
    }

    #[test]
    fn options() {
        let mut o = CreateOptions::default();
        apply(
            &mut o,
            "cluster_size=4k,compat=0.10,lazy_refcounts=off,backing_file=b.qcow2,backing_fmt=qcow2",
        )
        .unwrap();
        assert_eq!((o.cluster_size, o.version), (4096, 2));
        assert_eq!(o.backing, Some(("b.qcow2".into(), Some(Format::Qcow2))));
        assert!(apply(&mut o, "nonsense=1").is_err());
        apply(
            &mut o,
            "encrypt.format=luks,encrypt.cipher-alg=twofish-256,encrypt.iter-time=10",
        )
        .unwrap();
        let Some(Keying::Fresh(r)) = &o.encrypt else {
            panic!("luks asked for")
        };
        assert_eq!(
            (r.cipher_alg.as_deref(), r.iter_time),
            (Some("twofish-256"), Some(10))
        );
        assert!(apply(&mut o, "encrypt.format=aes").is_err());
        assert!(apply(&mut o, "encrypt.nonsense=1").is_err());
        assert!(apply(&mut o, "extended_l2=maybe").is_err());
    }
}
