#![no_main]
//! `qmprestore check` on arbitrary bytes: any panic, hang or unbounded allocation is a finding.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    qmpbackup::qcow2::fuzz::check_bytes(data);
});
