//! How commands hand their reports to standard output (the log and warnings go to standard
//! error, so a script can parse what is printed here).

use anyhow::Result;
use std::io::Write;
use std::process::ExitCode;

/// Writes a command's report to standard output.
pub fn print(report: &str) -> Result<ExitCode> {
    std::io::stdout().lock().write_all(report.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

/// Writes `value` as one pretty-printed JSON document to standard output.
pub fn print_json(value: &impl serde::Serialize) -> Result<ExitCode> {
    print(&format!("{}\n", serde_json::to_string_pretty(value)?))
}
