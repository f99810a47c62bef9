//! What both command-line front ends share: the privacy of the files they create, and their
//! shell completions and manual pages (generated from the same clap definitions as `--help`,
//! so they never drift from the options).

use clap::Command;
use std::io::Write;
use std::process::ExitCode;

/// Backups and restored images hold whole guest disks: every folder and file the process
/// creates from now on is private to its owner (0700/0600), or shared with the owner's group
/// for reading (`group_readable`: 0750/0640), whatever umask the caller had. Files and
/// folders that exist already keep their modes. Call before any thread starts.
pub fn restrict_new_files(group_readable: bool) {
    let mask = if group_readable { 0o027 } else { 0o077 };
    // SAFETY: umask only swaps the process's file-creation mask.
    unsafe { libc::umask(mask) };
}

/// Whether a stream should get colour: a terminal, and no `NO_COLOR` in the environment.
pub fn colour_for(is_terminal: bool) -> bool {
    is_terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Writes the completion script of `cmd` for `shell`.
pub fn completions(shell: clap_complete::Shell, mut cmd: Command, out: &mut dyn Write) {
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, out);
}

/// Prints the manual page of `cmd` (roff, section 1) on standard output.
pub fn print_man(cmd: Command) -> ExitCode {
    let name = cmd.get_name().to_string();
    match clap_mangen::Man::new(cmd).render(&mut std::io::stdout()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::from(1)
        }
    }
}
