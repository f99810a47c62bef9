//! Time as backup folders carry it: epochs in file names, local-time renderings (snapshot
//! names of `snapshotrebase`, `--monthly` folders, log lines), and the times `--until` takes.

/// `YYYY-MM-DD HH:MM:SS` in the local time zone, as qemu-img prints snapshot dates.
pub fn local_time(epoch: i64) -> String {
    // SAFETY: localtime_r writes into the tm we own; a zeroed tm is a valid initial value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let t = epoch as libc::time_t;
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return epoch.to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// `YYYY-MM` of `epoch` in local time (the original's --monthly directory).
pub fn month_of(epoch: u64) -> String {
    local_time(epoch as i64)[..7].to_string()
}

/// Epoch seconds, or ISO 8601 `YYYY-MM-DD[THH:MM[:SS]][Z|±HH:MM]` (local time without a zone).
pub fn parse_time(s: &str) -> Option<u64> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().ok();
    }
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i32> { s.get(r)?.parse().ok() };
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (mut hour, mut min, mut sec, mut pos) = (0, 0, 0, 10);
    if b.len() > 10 {
        if b[10] != b'T' && b[10] != b' ' {
            return None;
        }
        hour = num(11..13)?;
        min = num(14..16)?;
        pos = 16;
        if b.get(16) == Some(&b':') {
            sec = num(17..19)?;
            pos = 19;
        }
    }
    let zone = &s[pos..];
    let offset = match zone {
        "" => None,
        "Z" => Some(0),
        z if (z.starts_with('+') || z.starts_with('-')) && z.len() == 6 => {
            let h: i64 = z[1..3].parse().ok()?;
            let m: i64 = z[4..6].parse().ok()?;
            let sign = if z.starts_with('-') { -1 } else { 1 };
            Some(sign * (h * 3600 + m * 60))
        }
        _ => return None,
    };
    // SAFETY: a zeroed tm is valid input for mktime/timegm, which only read and normalise it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    tm.tm_year = year - 1900;
    tm.tm_mon = month - 1;
    tm.tm_mday = day;
    tm.tm_hour = hour;
    tm.tm_min = min;
    tm.tm_sec = sec;
    tm.tm_isdst = -1;
    let t = match offset {
        None => (unsafe { libc::mktime(&mut tm) }) as i64,
        Some(off) => (unsafe { libc::timegm(&mut tm) }) as i64 - off,
    };
    u64::try_from(t).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(parse_time("1700000000"), Some(1_700_000_000));
        assert_eq!(parse_time("2023-11-14T22:13:20Z"), Some(1_700_000_000));
        assert_eq!(parse_time("2023-11-14T23:13:20+01:00"), Some(1_700_000_000));
        assert_eq!(parse_time("2023-11-14T22:13Z"), Some(1_699_999_980));
        assert!(parse_time("2023-11-14").is_some());
        assert_eq!(parse_time("INC-1700"), None);
        assert_eq!(parse_time("2023-11-14X"), None);
        assert_eq!(month_of(1_700_000_000).len(), 7);
    }
}
