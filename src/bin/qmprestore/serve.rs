//! `qmprestore serve`: restore points (or images) read-only over NBD, until a signal.

use crate::options::{ImageFormat, SelectArgs};
use anyhow::{Context, Result};
use qmpbackup::qcow2::Format;
use qmpbackup::serve;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub const HELP: &str = "Examples:
  qmprestore serve --dir /backup/vm1/disk1.qcow2 --socket /run/restore.sock
  qemu-img convert -O raw 'nbd+unix:///?socket=/run/restore.sock' disk1.raw

  qmprestore serve --dir /backup/vm1 --until 2026-11-30T12:00 --listen 127.0.0.1:10809
  nbdinfo --list nbd://127.0.0.1:10809      (one export per disk folder)

  qmprestore serve --dir /backup/vm1/disk1.qcow2 --listen 0.0.0.0:10809 \\
      --tls-creds /etc/pki/qemu --tls-verify-peer

Live restore (the VM runs at once; block-stream copies the rest in the background):
  qmprestore serve --dir /backup/vm1/disk1.qcow2 --socket /run/r.sock &
  qmprestore create -u -b 'nbd+unix:///?socket=/run/r.sock' -F raw disk1.qcow2 20G
  qemu-system-x86_64 ... -drive file=disk1.qcow2,if=virtio,id=d0   then QMP:
  {\"execute\": \"block-stream\", \"arguments\": {\"job-id\": \"r\", \"device\": \"d0\"}}

The default export (empty name) is the restore point; with --dir naming a backup target that
holds several disk folders, each disk is an export named after its folder. The socket accepts
connections only once every export is open. Serves until SIGINT/SIGTERM (exit 0 once the
requests in flight are answered), or with --once until the last client leaves.";

#[derive(clap::Args)]
pub struct Args {
    /// Backup directory of one disk, or a backup target holding one folder per disk.
    #[arg(long, conflicts_with_all = ["image", "format"], required_unless_present = "image")]
    dir: Option<PathBuf>,
    #[command(flatten)]
    select: SelectArgs,
    /// An image to serve with its backing chain (instead of --dir).
    image: Option<PathBuf>,
    /// Format of IMAGE (probed when omitted).
    #[arg(short = 'f', long = "format", value_enum)]
    format: Option<ImageFormat>,
    /// Listen on this unix socket (created mode 0600; only a stale socket is replaced).
    #[arg(long, conflicts_with = "listen")]
    socket: Option<PathBuf>,
    /// Listen on TCP HOST:PORT; other than loopback only with --tls-creds or --insecure.
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,
    /// Another name for the export besides the default (empty) one.
    #[arg(long = "name", value_name = "EXPORT")]
    name: Option<String>,
    /// Require TLS, with QEMU's tls-creds-x509 files from DIR (server-cert.pem,
    /// server-key.pem; ca-cert.pem for --tls-verify-peer).
    #[arg(long, value_name = "DIR")]
    tls_creds: Option<PathBuf>,
    /// Accept only clients whose certificate chains to DIR/ca-cert.pem.
    #[arg(long, requires = "tls_creds")]
    tls_verify_peer: bool,
    /// Allow clear text on an address other than loopback (a trusted network).
    #[arg(long)]
    insecure: bool,
    /// Exit when the last client disconnects.
    #[arg(long)]
    once: bool,
    /// Write the server's process id to this file once it accepts connections.
    #[arg(long, value_name = "FILE")]
    pidfile: Option<PathBuf>,
    /// Close connections that have not finished negotiating after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = serve::HANDSHAKE_LIMIT.as_secs())]
    handshake_limit: u64,
}

pub fn run(a: Args) -> Result<ExitCode> {
    let exports = match (&a.dir, &a.image) {
        (Some(d), _) => serve::Exports::of_dir(d, &a.select.select(), a.name.as_deref())?,
        (None, Some(i)) => {
            serve::Exports::of_image(i, a.format.map(Format::from), a.name.as_deref())?
        }
        (None, None) => anyhow::bail!("give --dir DIR or an IMAGE to serve"),
    };
    let opts = serve::Options {
        tls: a
            .tls_creds
            .as_deref()
            .map(|d| serve::tls::server_config(d, a.tls_verify_peer))
            .transpose()?,
        once: a.once,
        handshake_limit: std::time::Duration::from_secs(a.handshake_limit),
    };
    let listeners = listeners(&a, opts.tls.is_some())?;
    for l in &listeners {
        for e in exports.iter() {
            let name = e.names().last().map_or("", |n| n.as_str());
            eprintln!(
                "qmprestore: serving {} ({})",
                l.uri(name, opts.tls.is_some()),
                e.description()
            );
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    if let Some(p) = &a.pidfile {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let served = serve::serve(&listeners, exports, &opts, &stop);
    if let Some(p) = &a.pidfile {
        let _ = std::fs::remove_file(p);
    }
    tracing::info!("served {} connections", served?);
    Ok(ExitCode::SUCCESS)
}

/// Where to listen: a unix socket, TCP, or the sockets systemd passed (LISTEN_FDS).
fn listeners(a: &Args, tls: bool) -> Result<Vec<serve::Listener>> {
    Ok(
        match (&a.socket, &a.listen, serve::Listener::inherited()?) {
            (Some(s), None, None) => vec![serve::Listener::unix(Path::new(s))?],
            (None, Some(addr), None) => serve::Listener::tcp(addr, tls, a.insecure)?,
            (None, None, Some(l)) => l,
            (None, None, None) => {
                anyhow::bail!("say where to listen: --socket PATH or --listen HOST:PORT")
            }
            _ => anyhow::bail!(
                "systemd passed listening sockets (LISTEN_FDS): --socket and --listen cannot be used with them"
            ),
        },
    )
}
