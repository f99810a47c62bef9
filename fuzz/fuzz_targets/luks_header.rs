#![no_main]
//! LUKS headers and key material, hostile: parsed, serialised back, unlocked.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    qmpbackup::qcow2::fuzz::luks_header(data);
});
