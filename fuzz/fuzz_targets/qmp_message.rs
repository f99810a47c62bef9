#![no_main]
//! QMP messages from an untrusted peer: any panic or unbounded allocation is a finding.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    qmpbackup::backup::fuzz::qmp_lines(data);
});
