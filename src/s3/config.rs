//! Where the store is and who we are to it, found the way AWS tools find it, so a host already
//! set up for the AWS CLI, rclone or s3cmd-style environments needs nothing new:
//!
//! - credentials: `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`), else
//!   the profile's entry in `~/.aws/credentials` (`AWS_SHARED_CREDENTIALS_FILE`), else in
//!   `~/.aws/config` (`AWS_CONFIG_FILE`); the profile is `AWS_PROFILE` or `default`;
//! - region: `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's `region`, else `us-east-1`;
//! - endpoint: `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, the profile's `endpoint_url`, else
//!   AWS itself. A custom endpoint (MinIO, Garage, Ceph) is addressed path-style, AWS
//!   virtual-host style; an `http://` endpoint is used as written, with a warning unless it
//!   is on this host;
//! - trust: the built-in web PKI roots, or the PEM bundle `AWS_CA_BUNDLE` names instead.

use super::error::S3Error;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Clone)]
pub struct Config {
    pub endpoint: url::Url,
    pub path_style: bool,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    pub session_token: Option<String>,
    pub ca_bundle: Option<PathBuf>,
    /// Requests kept in flight when many objects are wanted at once (a chain's metadata):
    /// `QMPBACKUP_S3_REQUESTS`, default [`REQUESTS`].
    pub requests: usize,
}

/// Requests in flight by default: a store answers dozens at once, and each costs a thread
/// with a small stack while it waits.
pub const REQUESTS: usize = 64;
/// The most `QMPBACKUP_S3_REQUESTS` may ask for.
const MAX_REQUESTS: usize = 1024;

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("Config")
            .field("endpoint", &self.endpoint.as_str())
            .field("path_style", &self.path_style)
            .field("region", &self.region)
            .field("access_key", &self.access_key)
            .field("requests", &self.requests)
            .finish()
    }
}

/// One profile's settings from an AWS-style INI file.
type Section = HashMap<String, String>;

/// The `[name]` section of an AWS INI file (`config` names profiles `[profile name]`, except
/// `[default]`). A missing file is an empty section; an unreadable one an error.
fn section(path: &Path, name: &str, config_style: bool) -> Result<Section, S3Error> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Section::new()),
        Err(e) => return Err(S3Error::Config(format!("{}: {e}", path.display()))),
    };
    let wanted = if config_style && name != "default" {
        format!("profile {name}")
    } else {
        name.to_string()
    };
    let mut out = Section::new();
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(head) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = head.trim() == wanted;
            continue;
        }
        if let (true, Some((k, v))) = (inside, line.split_once('=')) {
            out.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    Ok(out)
}

impl Config {
    /// The configuration of this process's environment.
    pub fn from_env() -> Result<Config, S3Error> {
        Config::resolve(&|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// The configuration `var` describes (an environment lookup).
    pub fn resolve(var: &dyn Fn(&str) -> Option<String>) -> Result<Config, S3Error> {
        let home = var("HOME").map(PathBuf::from).unwrap_or_default();
        let profile = var("AWS_PROFILE").unwrap_or_else(|| "default".into());
        let config_file = var("AWS_CONFIG_FILE")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join(".aws/config"));
        let creds_file = var("AWS_SHARED_CREDENTIALS_FILE")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join(".aws/credentials"));
        let conf = section(&config_file, &profile, true)?;
        let creds = section(&creds_file, &profile, false)?;
        let from_files = |k: &str| creds.get(k).or_else(|| conf.get(k)).cloned();

        let (access_key, secret_key, session_token) =
            match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
                (Some(a), Some(s)) => (a, s, var("AWS_SESSION_TOKEN")),
                _ => match (
                    from_files("aws_access_key_id"),
                    from_files("aws_secret_access_key"),
                ) {
                    (Some(a), Some(s)) => (a, s, from_files("aws_session_token")),
                    _ => {
                        return Err(S3Error::Config(format!(
                            "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or give profile '{profile}' aws_access_key_id and aws_secret_access_key in {}",
                            creds_file.display()
                        )))
                    }
                },
            };
        let region = var("AWS_REGION")
            .or_else(|| var("AWS_DEFAULT_REGION"))
            .or_else(|| conf.get("region").cloned())
            .unwrap_or_else(|| "us-east-1".into());
        let custom = var("AWS_ENDPOINT_URL_S3")
            .or_else(|| var("AWS_ENDPOINT_URL"))
            .or_else(|| conf.get("endpoint_url").cloned());
        let (endpoint, path_style) = match custom {
            Some(e) => (parse_endpoint(&e)?, true),
            None => (
                parse_endpoint(&format!("https://s3.{region}.amazonaws.com"))?,
                false,
            ),
        };
        Ok(Config {
            endpoint,
            path_style,
            region,
            access_key,
            secret_key,
            session_token,
            ca_bundle: var("AWS_CA_BUNDLE").map(PathBuf::from),
            requests: match var("QMPBACKUP_S3_REQUESTS") {
                None => REQUESTS,
                Some(v) => v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_REQUESTS).contains(n))
                    .ok_or_else(|| {
                        S3Error::Config(format!(
                            "QMPBACKUP_S3_REQUESTS={v}: give a number of requests from 1 to {MAX_REQUESTS}"
                        ))
                    })?,
            },
        })
    }

    /// Whether requests go over the network unencrypted to another host.
    pub fn plain_http_off_host(&self) -> bool {
        self.endpoint.scheme() == "http"
            && !match self.endpoint.host() {
                Some(url::Host::Domain(d)) => d == "localhost",
                Some(url::Host::Ipv4(a)) => a.is_loopback(),
                Some(url::Host::Ipv6(a)) => a.is_loopback(),
                None => false,
            }
    }
}

fn parse_endpoint(s: &str) -> Result<url::Url, S3Error> {
    let url: url::Url = s
        .parse()
        .map_err(|e| S3Error::Config(format!("endpoint {s}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(S3Error::Config(format!(
            "endpoint {s}: not an http:// or https:// URL with a host"
        )));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(vars: &[(&str, String)]) -> Result<Config, S3Error> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        Config::resolve(&|k| map.get(k).cloned())
    }

    #[test]
    fn the_environment_wins_over_the_profile_files() {
        let t = tempfile::tempdir().unwrap();
        let aws = t.path().join(".aws");
        std::fs::create_dir(&aws).unwrap();
        std::fs::write(
            aws.join("config"),
            "[default]\nregion = eu-west-1\n[profile lab]\nregion = garage\nendpoint_url = http://10.0.0.5:3900\n",
        )
        .unwrap();
        std::fs::write(
            aws.join("credentials"),
            "[default]\naws_access_key_id = AKDEF\naws_secret_access_key = sdef\n[lab]\naws_access_key_id = AKLAB\naws_secret_access_key = slab\naws_session_token = tok\n",
        )
        .unwrap();
        let home = ("HOME", t.path().display().to_string());

        let c = resolve(std::slice::from_ref(&home)).unwrap();
        assert_eq!(
            (c.access_key.as_str(), c.region.as_str()),
            ("AKDEF", "eu-west-1")
        );
        assert_eq!(c.endpoint.as_str(), "https://s3.eu-west-1.amazonaws.com/");
        assert!(!c.path_style && !c.plain_http_off_host());

        let c = resolve(&[home.clone(), ("AWS_PROFILE", "lab".into())]).unwrap();
        assert_eq!(
            (c.access_key.as_str(), c.session_token.as_deref()),
            ("AKLAB", Some("tok"))
        );
        assert_eq!((c.region.as_str(), c.path_style), ("garage", true));
        assert!(c.plain_http_off_host());

        let c = resolve(&[
            home.clone(),
            ("AWS_PROFILE", "lab".into()),
            ("AWS_ACCESS_KEY_ID", "AKENV".into()),
            ("AWS_SECRET_ACCESS_KEY", "senv".into()),
            ("AWS_DEFAULT_REGION", "r2".into()),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:3900".into()),
        ])
        .unwrap();
        assert_eq!(
            (c.access_key.as_str(), c.session_token.as_deref()),
            ("AKENV", None)
        );
        assert_eq!(c.region, "r2");
        assert!(!c.plain_http_off_host());
        assert!(!format!("{c:?}").contains("senv"));

        let none = resolve(&[("HOME", "/nonexistent".into())]).unwrap_err();
        assert!(none.to_string().contains("AWS_ACCESS_KEY_ID"), "{none}");
        let bad = resolve(&[
            ("AWS_ACCESS_KEY_ID", "a".into()),
            ("AWS_SECRET_ACCESS_KEY", "b".into()),
            ("AWS_ENDPOINT_URL", "ftp://x".into()),
        ]);
        assert!(bad.is_err());
    }

    #[test]
    fn requests_in_flight_default_and_bounds() {
        let keys = [
            ("AWS_ACCESS_KEY_ID", "a".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "b".into()),
            ("HOME", "/nonexistent".into()),
        ];
        assert_eq!(resolve(&keys).unwrap().requests, REQUESTS);
        let with = |v: &str| {
            let mut vars = keys.to_vec();
            vars.push(("QMPBACKUP_S3_REQUESTS", v.into()));
            resolve(&vars)
        };
        assert_eq!(with("8").unwrap().requests, 8);
        for bad in ["0", "1025", "many"] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains("QMPBACKUP_S3_REQUESTS"), "{e}");
        }
    }
}
