//! Opens arbitrary bytes as a qcow2 image, walks its whole mapping and reads its data.
//! Any panic, hang or unbounded allocation is a finding; errors are the expected outcome.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    qmpbackup::qcow2::fuzz::open_read(data);
});
