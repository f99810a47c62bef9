//! `qmprestore key add|remove`: rotate the passphrases of LUKS-encrypted images.

use anyhow::Result;
use qmpbackup::chain::keys;
use qmpbackup::qcow2::crypto::keys::read_key_file;
use std::path::PathBuf;
use std::process::ExitCode;

pub const HELP: &str = "Examples:
  qmprestore key add --key-file old.key --new-key-file new.key disk.qcow2
  qmprestore key remove --key-file new.key --remove-key-file old.key disk.qcow2

The image is opened with --key-file (any passphrase that opens it); the data is not
rewritten. The last key slot that opens an image is never removed.";

#[derive(clap::Subcommand)]
pub enum Action {
    /// Add a key slot that the passphrase in --new-key-file opens.
    Add {
        /// The new passphrase (the file's bytes, a trailing newline included).
        #[arg(long, value_name = "FILE")]
        new_key_file: PathBuf,
        /// PBKDF2 time of the new slot in milliseconds (QEMU's default: 2000).
        #[arg(long, default_value_t = qmpbackup::qcow2::crypto::DEFAULT_ITER_TIME_MS)]
        iter_time: u64,
        /// The images.
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// Remove every key slot the passphrase in --remove-key-file opens.
    Remove {
        #[arg(long, value_name = "FILE")]
        remove_key_file: PathBuf,
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
}

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

pub fn run(a: Args) -> Result<ExitCode> {
    match a.action {
        Action::Add {
            new_key_file,
            iter_time,
            images,
        } => {
            let new = read_key_file(&new_key_file).map_err(anyhow::Error::msg)?;
            for image in &images {
                let slot = keys::add(image, &new, iter_time)?;
                println!("{}: key slot {slot} added", image.display());
            }
        }
        Action::Remove {
            remove_key_file,
            images,
        } => {
            let old = read_key_file(&remove_key_file).map_err(anyhow::Error::msg)?;
            for image in &images {
                let slots: Vec<String> = keys::remove(image, &old)?
                    .iter()
                    .map(usize::to_string)
                    .collect();
                println!(
                    "{}: key slot(s) {} removed",
                    image.display(),
                    slots.join(", ")
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
