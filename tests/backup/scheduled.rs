//! The packaged scheduled backup: `qmpbackup@.service` run with the example config
//! (`packaging/vm.conf`) the way systemd runs it, against a real QEMU. A unit whose command
//! line is not a valid qmpbackup invocation, or an example config that does not make a
//! restorable chain, fails here rather than on an admin's host at night.

use crate::common::backup_vm::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const UNIT: &str = "packaging/systemd/qmpbackup@.service";
const TIMER: &str = "packaging/systemd/qmpbackup@.timer";
const EXAMPLE: &str = "packaging/vm.conf";

/// Two runs of the unit for instance `vm1` (the timer's first night: a FULL, the next: an
/// INC) with the example config, its SOCKET and TARGET set to this VM's; both restore points
/// restore to the disk as it was.
#[test]
fn the_service_unit_backs_up_with_the_example_config() {
    let Some(mut s) = BackupVm::one_disk() else {
        return;
    };
    let unit = read(UNIT);
    let service = section(&unit, "Service");
    assert_eq!(service["Type"], ["oneshot"]);
    assert_eq!(service["EnvironmentFile"], ["/etc/qmpbackup/%i.conf"]);

    // What the admin does to the example: point it at the VM and a target.
    let mut env = HashMap::new();
    for assignment in &service["Environment"] {
        env.extend(parse_env_file(assignment));
    }
    env.extend(parse_env_file(&read(EXAMPLE)));
    env.insert("SOCKET".into(), s.vm.socket());
    env.insert("TARGET".into(), s.tgt().to_string());
    let argv = expand_exec(&service["ExecStart"][0], &env);
    assert_eq!(argv[0], "/usr/bin/qmpbackup");

    let run = |tag: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_qmpbackup"))
            .args(&argv[1..])
            .env_clear()
            .envs(&env)
            .output()
            .unwrap();
        let log = crate::common::qemu::log_of(&out);
        assert!(out.status.success(), "run {tag} of {argv:?} failed:\n{log}");
        assert!(
            log.contains("Backup for all [1] devices finished."),
            "{log}"
        );
    };
    s.vm.write(D0.io, 0x5a, 0, MIB);
    run("0");
    s.capture(&[&D0], "0");
    s.vm.write(D0.io, 0xa5, 4 * MIB, MIB);
    run("1");
    s.capture(&[&D0], "1");

    // The example asks for --monthly: the chain is in this month's folder.
    let month = month_folder(&s.target);
    let names = files(&month.join(D0.file));
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        names[0].starts_with("FULL-") && names[1].starts_with("INC-"),
        "{names:?}"
    );
    for (i, name) in names.iter().enumerate() {
        assert_restores(
            &month.join(D0.file),
            Some(name),
            &s.captured(&D0, &i.to_string()),
        );
    }

    let timer = section(&read(TIMER), "Timer");
    assert_eq!(timer["Persistent"], ["true"]);
    assert!(timer.contains_key("RandomizedDelaySec") && timer.contains_key("OnCalendar"));
    assert_eq!(
        section(&read(TIMER), "Install")["WantedBy"],
        ["timers.target"]
    );
}

fn read(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `YYYY-MM` folder of a `--monthly` target (there must be exactly one).
fn month_folder(target: &Path) -> PathBuf {
    let months: Vec<PathBuf> = std::fs::read_dir(target)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.len() == 7 && name.as_bytes()[4] == b'-' && p.is_dir()
        })
        .collect();
    assert_eq!(months.len(), 1, "{months:?}");
    months.into_iter().next().unwrap()
}

/// The settings of one `[name]` section of a unit file, each key with its values in order.
fn section(unit: &str, name: &str) -> HashMap<String, Vec<String>> {
    let mut settings: HashMap<String, Vec<String>> = HashMap::new();
    let mut inside = false;
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == format!("[{name}]");
        } else if inside && !line.is_empty() && !line.starts_with(['#', ';']) {
            let (key, value) = line.split_once('=').expect("a unit line is key=value");
            settings.entry(key.into()).or_default().push(value.into());
        }
    }
    settings
}

/// `KEY=value` lines as systemd's EnvironmentFile= reads them: comments and blank lines
/// skipped, one pair of double quotes around a value removed.
fn parse_env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with(['#', ';']))
        .map(|l| {
            let (key, value) = l.split_once('=').expect("an environment line is KEY=value");
            let value = value.strip_prefix('"').and_then(|v| v.strip_suffix('"'));
            (
                key.to_string(),
                value.unwrap_or(&l[key.len() + 1..]).to_string(),
            )
        })
        .collect()
}

/// An ExecStart= line expanded as systemd does: a word `${VAR}` is one argument (empty when
/// unset), a word `$VAR` is the value split at whitespace (no argument when empty).
fn expand_exec(line: &str, env: &HashMap<String, String>) -> Vec<String> {
    let value = |name: &str| env.get(name).cloned().unwrap_or_default();
    line.split_whitespace()
        .flat_map(|word| {
            if let Some(name) = word.strip_prefix("${").and_then(|w| w.strip_suffix('}')) {
                vec![value(name)]
            } else if let Some(name) = word.strip_prefix('$') {
                value(name).split_whitespace().map(String::from).collect()
            } else {
                assert!(!word.contains('$'), "{word}: a variable inside a word");
                vec![word.to_string()]
            }
        })
        .collect()
}
