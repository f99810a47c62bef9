//! What both command-line front ends share: the privacy of the files they create, and their
//! shell completions and manual pages (generated from the same clap definitions as `--help`,
//! so they never drift from the options).

use clap::Command;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

/// What `--version` prints after the program's name: the crate's version and, when known, the
/// commit it was built from (see build.rs), so a bug report names the exact code.
pub const VERSION: &str = env!("QMPBACKUP_LONG_VERSION");

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

/// The subcommands both programs have that describe the program instead of doing its work;
/// flattened into each program's subcommands.
#[derive(clap::Subcommand)]
pub enum SelfDoc {
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) on standard output, or write every page into a folder.
    Man {
        /// Write one page per command (PROGRAM.1, PROGRAM-SUBCOMMAND.1, …) into DIR.
        #[arg(long, value_name = "DIR")]
        dir: Option<std::path::PathBuf>,
    },
}

impl SelfDoc {
    /// Prints (or writes) what was asked of `cmd`, the program's command line.
    pub fn run(self, cmd: Command) -> ExitCode {
        match self {
            SelfDoc::Completions { shell } => {
                completions(shell, cmd, &mut std::io::stdout());
                ExitCode::SUCCESS
            }
            SelfDoc::Man { dir } => man(cmd, dir.as_deref()),
        }
    }
}

/// Parses the process's arguments as `C`'s command line, returning that command line too (with
/// the examples of [`SelfDoc`] that name the program) for help, errors and [`SelfDoc::run`].
pub fn parse<C: clap::Parser>() -> (C, Command) {
    parse_from(std::env::args_os())
}

/// [`parse`] of the given arguments (the program name first).
pub fn parse_from<C: clap::Parser>(
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> (C, Command) {
    let mut cmd = with_self_doc_examples(C::command());
    let matches = cmd.clone().get_matches_from(args);
    match C::from_arg_matches(&matches) {
        Ok(cli) => (cli, cmd),
        Err(e) => e.format(&mut cmd).exit(),
    }
}

/// `cmd` with examples under `completions` and `man` that name the program.
fn with_self_doc_examples(cmd: Command) -> Command {
    let name = cmd.get_name().to_string();
    cmd.mut_subcommand("completions", |c| {
        c.after_help(format!(
            "Example:\n  {name} completions bash > /etc/bash_completion.d/{name}"
        ))
    })
    .mut_subcommand("man", |c| {
        c.after_help(format!(
            "Examples:\n  {name} man > /usr/local/share/man/man1/{name}.1\n  {name} man --dir /usr/local/share/man/man1   ({name}.1, {name}-<subcommand>.1, ...)"
        ))
    })
}

/// Writes the completion script of `cmd` for `shell`.
fn completions(shell: clap_complete::Shell, mut cmd: Command, out: &mut dyn Write) {
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, out);
}

/// The manual: with `dir`, one page per command and subcommand (`qmprestore.1`,
/// `qmprestore-merge.1`, …, the pages the main page's SUBCOMMANDS section names) written into
/// `dir`, their paths printed; without, the main page (roff, section 1) on standard output.
fn man(cmd: Command, dir: Option<&Path>) -> ExitCode {
    let name = cmd.get_name().to_string();
    // `help` is a subcommand of the command line, not a page: the main page names none.
    let mut cmd = cmd.disable_help_subcommand(true);
    // Gives each subcommand its display name (`qmprestore-merge`), which names its page.
    cmd.build();
    let result = match dir {
        None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout()),
        Some(dir) => write_pages(cmd, dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let place = dir.map_or("standard output".into(), |d| d.display().to_string());
            eprintln!("{name}: writing the manual to {place}: {e}");
            ExitCode::from(1)
        }
    }
}

fn write_pages(cmd: Command, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut pages = vec![cmd.clone()];
    pages.extend(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    for page in pages {
        let path = clap_mangen::Man::new(page).generate_to(dir)?;
        println!("{}", path.display());
    }
    Ok(())
}
