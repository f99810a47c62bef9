//! Human-readable sizes, formatted like QEMU's `size_to_str` so `info` output reads the same
//! as qemu-img's.

/// `67108864` → `"64 MiB"`, `1536` → `"1.5 KiB"`: three significant digits, binary units,
/// switching to the next unit from 1000 on.
pub fn size(bytes: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let mut unit = 0;
    while unit + 1 < SUFFIXES.len() && bytes as f64 >= 1000.0 * (1u64 << (10 * unit)) as f64 {
        unit += 1;
    }
    let v = bytes as f64 / (1u64 << (10 * unit)) as f64;
    // C's %0.3g: three significant digits, trailing zeros dropped.
    let decimals = if v > 0.0 {
        (2 - v.log10().floor() as i32).max(0) as usize
    } else {
        0
    };
    let s = format!("{v:.decimals$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s} {}B", SUFFIXES[unit])
}

#[cfg(test)]
mod tests {
    #[test]
    fn like_qemu() {
        assert_eq!(super::size(0), "0 B");
        assert_eq!(super::size(1024), "1 KiB");
        assert_eq!(super::size(221184), "216 KiB");
        assert_eq!(super::size(64 << 20), "64 MiB");
        assert_eq!(super::size(1536), "1.5 KiB");
        assert_eq!(super::size(1000), "0.977 KiB");
        assert_eq!(super::size(2 << 40), "2 TiB");
    }
}
