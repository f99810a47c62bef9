#![no_main]
//! A client's whole side of an NBD connection (negotiation and transmission), from an
//! untrusted client.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    qmpbackup::serve::fuzz::session(data);
});
