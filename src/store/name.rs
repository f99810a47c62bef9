//! The names of backup files, both tools' grammar: `FULL-<epoch>-<disk>`,
//! `INC-<epoch>-<disk>`, `COPY-<epoch>-<disk>`, or just `<disk>` with `--no-timestamp` (plus a
//! `FULL-<disk>` / `COPY-<disk>` symlink), each with `.partial` while a backup runs. Every
//! spelling of a level is defined here and nowhere else.

/// The kind of a backup file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Full,
    Inc,
    Copy,
}

impl Level {
    pub const ALL: [Level; 3] = [Level::Full, Level::Inc, Level::Copy];

    /// As the command line and the manifests spell it: `full`, `inc`, `copy`.
    pub fn name(self) -> &'static str {
        match self {
            Level::Full => "full",
            Level::Inc => "inc",
            Level::Copy => "copy",
        }
    }

    /// As file names spell it: `FULL`, `INC`, `COPY`.
    pub fn tag(self) -> &'static str {
        match self {
            Level::Full => "FULL",
            Level::Inc => "INC",
            Level::Copy => "COPY",
        }
    }

    /// Whether a backup of this level belongs to a chain (needs the chain id and bitmap).
    pub fn chained(self) -> bool {
        self != Level::Copy
    }

    /// Whether the file holds only the changes since its predecessor.
    pub fn is_delta(self) -> bool {
        self == Level::Inc
    }

    /// Whether a backup of this level starts a chain (a restore begins with it).
    pub fn starts_chain(self) -> bool {
        self == Level::Full
    }

    /// The level a `FULL-<disk>` / `COPY-<disk>` alias names.
    pub fn of_alias(alias: &str) -> Option<Level> {
        let (tag, _) = alias.split_once('-')?;
        Level::ALL
            .into_iter()
            .find(|l| l.tag() == tag && !l.is_delta())
    }
}

/// Splits `FULL-1700000000-disk.qcow2` into (level, epoch, disk).
pub fn parse_name(name: &str) -> Option<(Level, u64, String)> {
    let (level, rest) = Level::ALL.into_iter().find_map(|l| {
        name.strip_prefix(l.tag())
            .and_then(|r| r.strip_prefix('-'))
            .map(|r| (l, r))
    })?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || rest.as_bytes().get(digits) != Some(&b'-') {
        return None;
    }
    let epoch = rest[..digits].parse().ok()?;
    Some((level, epoch, rest[digits + 1..].to_string()))
}

/// The final name of a backup file; `timestamp: false` is `--no-timestamp` (full and copy).
pub fn file_name(level: Level, epoch: u64, disk: &str, timestamp: bool) -> String {
    if timestamp {
        format!("{}-{epoch}-{disk}", level.tag())
    } else {
        disk.to_string()
    }
}

/// The alias `<LEVEL>-<disk>` of a `--no-timestamp` backup.
pub fn alias_name(level: Level, disk: &str) -> String {
    format!("{}-{disk}", level.tag())
}

/// The name of a backup file while it is being written.
pub fn partial_name(file: &str) -> String {
    format!("{file}.partial")
}

/// A partial file's backup name, if `name` is one.
pub fn strip_partial(name: &str) -> Option<&str> {
    name.strip_suffix(".partial")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            parse_name("INC-1700000600-disk.qcow2"),
            Some((Level::Inc, 1_700_000_600, "disk.qcow2".into()))
        );
        assert_eq!(
            parse_name("FULL-12-a-b"),
            Some((Level::Full, 12, "a-b".into()))
        );
        assert_eq!(parse_name("FULL-disk.qcow2"), None);
        assert_eq!(parse_name("INC-12"), None);
        assert_eq!(parse_name("disk.qcow2"), None);
        assert_eq!(parse_name("INCX-12-d"), None);
        assert_eq!(file_name(Level::Inc, 17, "d.qcow2", true), "INC-17-d.qcow2");
        assert_eq!(file_name(Level::Full, 17, "d.qcow2", false), "d.qcow2");
        assert_eq!(Level::of_alias("COPY-d.qcow2"), Some(Level::Copy));
        assert_eq!(Level::of_alias("INC-d.qcow2"), None);
        assert_eq!(strip_partial(&partial_name("x")), Some("x"));
    }
}
