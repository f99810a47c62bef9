#![no_main]
//! Backup directory discovery over hostile file names.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    qmpbackup::store::fuzz::dir_names(data);
});
