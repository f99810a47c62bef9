//! Entry point for the `qmp_message` fuzz target (and its regression test): QEMU's replies
//! and events are untrusted input too, whether from a buggy QEMU or a hostile peer on a TCP
//! socket. Each line is parsed as a QMP message; replies are read as `query-block` results
//! the way a backup run does, events as job events.

use super::device::parse_query_block;
use crate::qmp::{parse, Message};

/// Parses every line of `data`; returns how many were valid messages.
pub fn qmp_lines(data: &[u8]) -> usize {
    let mut valid = 0;
    for line in data.split(|&b| b == b'\n') {
        let Ok(msg) = parse(line) else { continue };
        valid += 1;
        match msg {
            Message::Return { value, .. } => {
                for d in parse_query_block(&value).into_iter().flatten() {
                    let _ = (d.basename(), d.is_pflash(), d.can_persist_bitmaps());
                }
            }
            Message::Event(e) => {
                let _ = (e.str("device"), e.str("error"), e.data["len"].as_u64());
            }
            Message::Greeting(_) | Message::Error { .. } => {}
        }
    }
    valid
}
