//! Entry point for the `guest_agent` fuzz target (and its regression test): the guest agent
//! runs inside the VM, so everything it sends is controlled by the guest, possibly a hostile
//! one. The bytes play the agent's side of a whole conversation (sync marker, stale replies,
//! answers to ping, info, status, freeze and thaw); any panic, hang or unbounded allocation is
//! a finding.

use super::agent::Agent;
use super::stream::Conn;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Runs a `--quiesce` conversation against `data` as the agent's output; returns how many
/// commands succeeded. Sync ids start at 1, so inputs can answer them.
pub fn agent_stream(data: &[u8]) -> usize {
    let Ok((ours, theirs)) = UnixStream::pair() else {
        return 0;
    };
    let data = data.to_vec();
    // The agent's side writes everything and closes: a conversation that wants more fails
    // with "closed" instead of waiting for a timeout.
    let writer = std::thread::spawn(move || {
        let mut theirs = theirs;
        let _ = theirs.write_all(&data);
        let _ = theirs.shutdown(std::net::Shutdown::Write);
        theirs
    });
    let timeout = Duration::from_secs(5);
    let mut ok = 0;
    if let Ok(conn) = Conn::over_unix(ours, "fuzz", timeout) {
        if let Ok(mut agent) = Agent::over(conn, timeout, 0) {
            ok += 1;
            ok += agent.ping().is_ok() as usize;
            ok += agent.can_freeze().is_ok() as usize;
            ok += agent.status().is_ok() as usize;
            ok += agent.freeze(timeout).is_ok() as usize;
            ok += agent.thaw().is_ok() as usize;
        }
    }
    // Our requests sit unread in the socket until `theirs` is dropped here.
    drop(writer.join());
    ok
}
