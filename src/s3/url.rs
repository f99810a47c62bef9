//! `s3://BUCKET/PREFIX` locations: where a backup folder or an image lives in a store.

use super::error::S3Error;
use std::path::Path;

/// The scheme every object-store location starts with.
pub const SCHEME: &str = "s3://";

/// A bucket and a key (an object) or key prefix (a folder) in it, without leading or trailing
/// slashes; `.` and `..` segments resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    pub key: String,
}

/// Whether `path` names an object-store location rather than a local file.
pub fn is_s3(path: &Path) -> bool {
    path.as_os_str()
        .as_encoded_bytes()
        .starts_with(SCHEME.as_bytes())
}

impl S3Url {
    pub fn parse(s: &str) -> Result<S3Url, S3Error> {
        let bad = |why: &str| S3Error::Url(s.to_string(), why.to_string());
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| bad("does not start with s3://"))?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        // The S3 bucket naming rules: 3-63 characters of lower-case letters, digits, dots
        // and hyphens, starting and ending with a letter or digit.
        let valid = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
            && bucket.as_bytes()[0].is_ascii_alphanumeric()
            && bucket.as_bytes()[bucket.len() - 1].is_ascii_alphanumeric();
        if !valid {
            return Err(bad(
                "not a valid bucket name (3-63 characters: a-z, 0-9, '.', '-')",
            ));
        }
        Ok(S3Url {
            bucket: bucket.to_string(),
            key: normalize(key).ok_or_else(|| bad("'..' leads above the bucket"))?,
        })
    }

    pub fn of_path(path: &Path) -> Result<S3Url, S3Error> {
        S3Url::parse(&path.to_string_lossy())
    }

    /// The location of `name` below this one (`name` may hold `/`, `.` and `..`).
    pub fn join(&self, name: &str) -> Result<S3Url, S3Error> {
        let joined = format!("{}/{name}", self.key);
        Ok(S3Url {
            bucket: self.bucket.clone(),
            key: normalize(&joined).ok_or_else(|| {
                S3Error::Url(self.to_string(), format!("'{name}' leads above the bucket"))
            })?,
        })
    }

    /// The key prefix of the objects inside this location as a folder (`key/`, or nothing at
    /// the bucket's top).
    pub fn folder_prefix(&self) -> String {
        if self.key.is_empty() {
            String::new()
        } else {
            format!("{}/", self.key)
        }
    }
}

impl std::fmt::Display for S3Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.key.is_empty() {
            write!(f, "{SCHEME}{}", self.bucket)
        } else {
            write!(f, "{SCHEME}{}/{}", self.bucket, self.key)
        }
    }
}

/// `a//b/./c/../d/` → `a/b/d`; `None` when `..` climbs above the top.
fn normalize(key: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for seg in key.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            s => parts.push(s),
        }
    }
    Some(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_join_and_print() {
        let u = S3Url::parse("s3://backups/vm1//disk1.qcow2/").unwrap();
        assert_eq!(
            (u.bucket.as_str(), u.key.as_str()),
            ("backups", "vm1/disk1.qcow2")
        );
        assert_eq!(u.to_string(), "s3://backups/vm1/disk1.qcow2");
        assert_eq!(u.join("../uuid").unwrap().key, "vm1/uuid");
        assert_eq!(u.folder_prefix(), "vm1/disk1.qcow2/");
        let top = S3Url::parse("s3://backups").unwrap();
        assert_eq!((top.key.as_str(), top.folder_prefix()), ("", String::new()));
        assert!(top.join("../x").is_err());
        for bad in [
            "s3://",
            "s3://A_b/x",
            "s3://ab",
            "s3://-ab/x",
            "/local/dir",
            "s3://b../",
        ] {
            assert!(S3Url::parse(bad).is_err(), "{bad}");
        }
        assert!(is_s3(Path::new("s3://b/k")) && !is_s3(Path::new("./s3:/x")));
    }
}
