//! qmpbackup's log, line for line in the original's format, because that is what cron jobs
//! and monitoring scripts written for the original grep.
//!
//! The original logs through Python's `logging` to standard output, as
//! `[2026-12-01 10:00:00,123]    INFO - main: message` (a file given with `-L` gets
//! `... - main  message`), and its first line names the version and the full command line.
//! We write the same shapes: the level as Python names it, right-aligned to seven characters;
//! the module that logs stands where Python names the function. Colour only on a terminal and
//! never with `NO_COLOR` (the original coloured piped output too). Syslog gets the message
//! with the usual `qmpbackup[pid]:` tag.

use indicatif::MultiProgress;
use std::io::{IsTerminal, Write};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Where the log goes besides the file and syslog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Console {
    /// Standard output, as the original.
    Stdout,
    /// Standard error: when standard output carries a report a script parses (`--json`).
    Stderr,
}

/// How one sink lays out a line.
#[derive(Clone, Copy)]
enum Style {
    /// The original's console format: `func: message`, coloured on a terminal.
    Console { colour: bool },
    /// The original's file format: `func  message`.
    File,
    /// `<priority>qmpbackup[pid]: message` for /dev/log.
    Syslog,
}

struct LineFormat(Style);

/// The name a log line gives where Python's logging gave the function: the component that
/// logs, from the event's target (its module unless a call names another). A module of the
/// backup half counts as one component with its submodules (`backup::run::graph` logs as
/// `run`), so splitting a module into files changes no log line; elsewhere the innermost
/// module names it.
fn logger_name(target: &str) -> &str {
    let mut parts = target.split("::");
    match (parts.next(), parts.next(), parts.next()) {
        (Some(_), Some("backup"), Some(component)) => component,
        _ => target.rsplit("::").next().unwrap_or("main"),
    }
}

/// Python's name for a level.
fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "INFO",
        _ => "DEBUG",
    }
}

/// `2026-12-01 10:00:00,123` in local time, as Python's `asctime`.
fn asctime() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{},{:03}",
        crate::store::time::local_time(now.as_secs() as i64),
        now.subsec_millis()
    )
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: format::Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let level = level_name(meta.level());
        let func = logger_name(meta.target());
        match self.0 {
            Style::Console { colour: false } => write!(w, "[{}] {level:>7} - {func}: ", asctime())?,
            Style::Console { colour: true } => {
                let c = match *meta.level() {
                    Level::ERROR => "\x1b[31m",
                    Level::WARN => "\x1b[33m",
                    Level::INFO => "",
                    _ => "\x1b[36m",
                };
                write!(
                    w,
                    "\x1b[32m[{}]\x1b[0m\x1b[34m {c}{level:>7}\x1b[0m - {func}:{c} ",
                    asctime()
                )?
            }
            Style::File => write!(w, "[{}] {level:>7} - {func}  ", asctime())?,
            Style::Syslog => {
                let priority = match *meta.level() {
                    Level::ERROR => 3,
                    Level::WARN => 4,
                    Level::INFO => 6,
                    _ => 7,
                };
                // Facility user (1): 8 + severity.
                write!(w, "<{}>qmpbackup[{}]: ", 8 + priority, std::process::id())?
            }
        }
        ctx.field_format().format_fields(w.by_ref(), event)?;
        if let Style::Console { colour: true } = self.0 {
            w.write_str("\x1b[0m")?;
        }
        writeln!(w)
    }
}

/// A sink that takes whole lines: a file appended to, or the syslog socket (one datagram per
/// line, without its newline).
#[derive(Clone)]
enum Sink {
    File(Arc<Mutex<std::fs::File>>),
    Syslog(Arc<UnixDatagram>),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::File(f) => {
                if let Ok(mut f) = f.lock() {
                    f.write_all(buf)?;
                }
            }
            Sink::Syslog(s) => {
                let line = buf.strip_suffix(b"\n").unwrap_or(buf);
                // A syslog daemon that is gone must not fail the backup.
                let _ = s.send(line);
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The progress bars on the terminal while a run shows them: console lines are written with
/// the bars hidden for a moment, so a line is never drawn into a bar nor wiped by its redraw.
static BARS: Mutex<Option<MultiProgress>> = Mutex::new(None);

/// Console lines go around `bars` until the guard is dropped.
pub fn around_bars(bars: &MultiProgress) -> BarsShown {
    *BARS.lock().unwrap_or_else(|p| p.into_inner()) = Some(bars.clone());
    BarsShown
}

/// While it lives, console lines go around the bars given to [`around_bars`].
pub struct BarsShown;

impl Drop for BarsShown {
    fn drop(&mut self) {
        *BARS.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// A console stream that writes each line around the bars on the terminal, if any.
struct AroundBars<W>(W);

impl<W: Write> Write for AroundBars<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bars = BARS.lock().unwrap_or_else(|p| p.into_inner());
        match bars.as_ref() {
            Some(m) => m.suspend(|| self.0.write_all(buf))?,
            None => self.0.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Installs the log: `console` always, `logfile` (appended; its folder created) and syslog
/// when asked. `QMPBACKUP_LOG` overrides the level filter (tracing's syntax).
pub fn init(
    console: Console,
    debug: bool,
    logfile: Option<&Path>,
    syslog: bool,
) -> std::io::Result<()> {
    let filter = || {
        // Debug lines are ours (the QMP and guest agent exchanges log as `qmp` and `qga`):
        // the HTTP and TLS crates' own (connection pools, handshakes) stay at info.
        let level = if debug {
            "info,qmpbackup=debug,qmp=debug,qga=debug"
        } else {
            "info"
        };
        tracing_subscriber::EnvFilter::try_from_env("QMPBACKUP_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level))
    };
    let fmt_layer = |style: Style| {
        tracing_subscriber::fmt::layer()
            .event_format(LineFormat(style))
            .with_ansi(false)
    };
    let console_layer = match console {
        Console::Stdout => fmt_layer(Style::Console {
            colour: crate::cli::colour_for(std::io::stdout().is_terminal()),
        })
        .with_writer(|| AroundBars(std::io::stdout()))
        .with_filter(filter())
        .boxed(),
        Console::Stderr => fmt_layer(Style::Console {
            colour: crate::cli::colour_for(std::io::stderr().is_terminal()),
        })
        .with_writer(|| AroundBars(std::io::stderr()))
        .with_filter(filter())
        .boxed(),
    };
    let mut layers = vec![console_layer];
    if let Some(p) = logfile {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)?;
        let sink = Sink::File(Arc::new(Mutex::new(f)));
        layers.push(
            fmt_layer(Style::File)
                .with_writer(move || sink.clone())
                .with_filter(filter())
                .boxed(),
        );
    }
    if syslog {
        let s = UnixDatagram::unbound()?;
        s.connect("/dev/log")?;
        let sink = Sink::Syslog(Arc::new(s));
        layers.push(
            fmt_layer(Style::Syslog)
                .with_writer(move || sink.clone())
                .with_filter(filter())
                .boxed(),
        );
    }
    tracing_subscriber::registry().with(layers).init();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::logger_name;

    #[test]
    fn log_lines_name_the_component_not_the_file() {
        assert_eq!(logger_name("qmpbackup::backup::run"), "run");
        assert_eq!(logger_name("qmpbackup::backup::run::graph"), "run");
        assert_eq!(logger_name("qmpbackup::backup::job"), "job");
        assert_eq!(logger_name("qmpbackup::qmp::client"), "client");
        assert_eq!(logger_name("qmpbackup"), "qmpbackup");
    }
}
