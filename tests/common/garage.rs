//! A Garage cluster on loopback for the s3:// tests (started by `tests/scripts/garage-cluster.sh`,
//! stopped when dropped), and commands that talk to it with exactly the AWS_* variables they
//! need: the environment of these machines carries others (AWS_CA_BUNDLE) that would change
//! what the tools do.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};

pub struct Garage {
    pub dir: tempfile::TempDir,
    /// The AWS_* variables of the cluster's key, region and first node's endpoint.
    pub env: Vec<(String, String)>,
    pub bucket: String,
}

fn garage_binary() -> Option<PathBuf> {
    let home = std::env::var("HOME").unwrap_or_default();
    let candidates = [
        std::env::var("GARAGE").ok().map(PathBuf::from),
        Some(PathBuf::from("garage")),
        Some(Path::new(&home).join(".cargo/bin/garage")),
    ];
    candidates.into_iter().flatten().find(|p| {
        Command::new(p)
            .arg("--help")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Ports for the next cluster: below the ephemeral range, apart per process and per cluster.
fn base_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let slot = (std::process::id() as u16 % 300 + n * 37) % 1000;
    20000 + slot * 10
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/garage-cluster.sh")
}

impl Garage {
    /// A cluster of `nodes` nodes (replication factor `nodes`) with a bucket and a key; `None`
    /// (after the [`super::skip`], a failure in CI) without Garage.
    pub fn start(nodes: usize) -> Option<Garage> {
        let Some(bin) = garage_binary() else {
            super::skip("garage is not installed (scripts/install-garage)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("sh")
            .arg(script())
            .args(["start"])
            .arg(dir.path().join("cluster"))
            .args([nodes.to_string(), base_port().to_string()])
            .env("GARAGE", &bin)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "garage cluster did not start: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(dir.path().join("cluster/env")).unwrap();
        let mut env = Vec::new();
        let mut bucket = String::new();
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            if k == "BUCKET" {
                bucket = v.to_string();
            } else {
                env.push((k.to_string(), v.to_string()));
            }
        }
        Some(Garage { dir, env, bucket })
    }

    pub fn var(&self, key: &str) -> String {
        self.env.iter().find(|(k, _)| k == key).unwrap().1.clone()
    }

    /// A client of the cluster's bucket in this process (configured like the commands).
    #[allow(dead_code)]
    pub fn client(&self) -> qmpbackup::s3::client::Client {
        let home = self.dir.path().to_path_buf();
        let config = qmpbackup::s3::config::Config::resolve(&|k| match k {
            "HOME" => Some(home.to_string_lossy().into_owned()),
            _ => self
                .env
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone()),
        })
        .unwrap();
        qmpbackup::s3::client::Client::new(&config, &self.bucket).unwrap()
    }

    /// `s3://BUCKET/<rest>`.
    pub fn url(&self, rest: &str) -> String {
        format!("s3://{}/{rest}", self.bucket)
    }

    /// `cmd` with every inherited AWS_* variable removed and the cluster's set.
    pub fn with_env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        let vars: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (&**k, &**v)).collect();
        super::aws_env(cmd, self.dir.path(), &vars)
    }

    pub fn qmprestore(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_qmprestore"));
        c.args(args);
        self.with_env(&mut c);
        c
    }

    pub fn qmpbackup(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_qmpbackup"));
        c.args(args);
        self.with_env(&mut c);
        c
    }

    /// rclone with this cluster as remote `g:` (an independent S3 client).
    pub fn rclone(&self, args: &[&str]) -> Command {
        let mut c = Command::new("rclone");
        c.args(args);
        self.with_env(&mut c);
        c.envs([
            ("RCLONE_CONFIG_G_TYPE", "s3".to_string()),
            ("RCLONE_CONFIG_G_PROVIDER", "Other".into()),
            ("RCLONE_CONFIG_G_ENDPOINT", self.var("AWS_ENDPOINT_URL")),
            (
                "RCLONE_CONFIG_G_ACCESS_KEY_ID",
                self.var("AWS_ACCESS_KEY_ID"),
            ),
            (
                "RCLONE_CONFIG_G_SECRET_ACCESS_KEY",
                self.var("AWS_SECRET_ACCESS_KEY"),
            ),
            ("RCLONE_CONFIG_G_REGION", self.var("AWS_REGION")),
            ("RCLONE_CONFIG_G_FORCE_PATH_STYLE", "true".into()),
        ]);
        c
    }

    /// `g:BUCKET/<rest>` for rclone.
    pub fn remote(&self, rest: &str) -> String {
        format!("g:{}/{rest}", self.bucket)
    }

    /// Kills node `n` (1-based) at once.
    pub fn kill_node(&self, n: usize) {
        let pid =
            std::fs::read_to_string(self.dir.path().join(format!("cluster/node{n}/pid"))).unwrap();
        unsafe { libc::kill(pid.trim().parse().unwrap(), libc::SIGKILL) };
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .arg(script())
            .arg("stop")
            .arg(self.dir.path().join("cluster"))
            .output();
    }
}
