#![no_main]
//! Manifests (JSON) and the files they describe, both hostile.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    qmpbackup::store::fuzz::manifest(data);
});
