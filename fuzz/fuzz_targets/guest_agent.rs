#![no_main]
//! A guest agent's side of a `--quiesce` conversation, from an untrusted guest.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    qmpbackup::qmp::fuzz::agent_stream(data);
});
