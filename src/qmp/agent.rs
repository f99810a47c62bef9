//! The guest-agent client, for `--quiesce`: freeze the guest's file systems for the instant of
//! the backup, and thaw them on every path out.
//!
//! The agent's channel is a byte stream that outlives our connection: replies to commands a
//! previous client sent (or that timed out) may still be in it. So every conversation starts
//! with `guest-sync-delimited`: we send 0xFF (which resets the agent's parser) and a sync
//! request with a fresh id, skip everything up to the agent's 0xFF marker, and read replies
//! until the one carrying our id arrives. After a timeout we synchronise again before the next
//! command, so a late reply can never be taken for the answer to another command.

use super::addr::Address;
use super::error::{QmpError, Result};
use super::message::{parse, Message};
use super::stream::Conn;
use serde_json::{json, Value};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezeState {
    Thawed,
    Frozen,
}

pub struct Agent {
    conn: Conn,
    timeout: Duration,
    sync_id: u64,
    in_sync: bool,
}

impl Agent {
    /// Connects and synchronises; `timeout` bounds every command but the freeze.
    pub fn connect(addr: &Address, timeout: Duration) -> Result<Agent> {
        let conn = Conn::connect(addr, timeout)?;
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Agent::over(conn, timeout, seed ^ u64::from(std::process::id()))
    }

    /// Synchronises over an open connection; sync ids count up from `seed`.
    pub(super) fn over(conn: Conn, timeout: Duration, seed: u64) -> Result<Agent> {
        let mut agent = Agent {
            conn,
            timeout,
            // Positive and below 2^31: qemu-ga reads the id as an int.
            sync_id: seed % 1_000_000_007,
            in_sync: false,
        };
        agent.sync()?;
        Ok(agent)
    }

    fn sync(&mut self) -> Result<()> {
        self.sync_id = self.sync_id % 1_000_000_007 + 1;
        let id = self.sync_id;
        let request = json!({"execute": "guest-sync-delimited", "arguments": {"id": id}});
        let mut bytes = vec![0xff];
        bytes.extend_from_slice(format!("{request}\n").as_bytes());
        tracing::debug!(target: "qga", "-> {request}");
        self.conn.send(&bytes)?;
        let deadline = Instant::now() + self.timeout;
        let what = "the guest agent's sync marker";
        self.conn
            .read_until(0xff, deadline, what)?
            .ok_or_else(|| self.timeout_error(what))?;
        loop {
            match self.reply(deadline, "the guest agent's sync reply")? {
                Ok(v) if v == json!(id) => break,
                other => tracing::debug!(target: "qga", "skipping stale reply {other:?}"),
            }
        }
        self.in_sync = true;
        Ok(())
    }

    fn timeout_error(&self, what: &str) -> QmpError {
        QmpError::Timeout {
            addr: self.conn.addr.clone(),
            what: what.to_string(),
            after: self.timeout,
        }
    }

    /// Reads lines up to the next reply; `Err` inside is a refused command (class, desc).
    fn reply(
        &mut self,
        deadline: Instant,
        what: &str,
    ) -> Result<std::result::Result<Value, (String, String)>> {
        loop {
            let line = self.conn.line(deadline, what, self.timeout)?;
            // The marker byte may precede a reply; blank lines are harmless.
            let text: Vec<u8> = line.into_iter().filter(|&b| b != 0xff).collect();
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            tracing::debug!(target: "qga", "<- {}", String::from_utf8_lossy(&text));
            match parse(&text) {
                Ok(Message::Return { value, .. }) => return Ok(Ok(value)),
                Ok(Message::Error { class, desc, .. }) => return Ok(Err((class, desc))),
                Ok(other) => tracing::debug!(target: "qga", "ignoring {other:?}"),
                Err(problem) => {
                    return Err(QmpError::Protocol {
                        addr: self.conn.addr.clone(),
                        problem,
                    })
                }
            }
        }
    }

    fn call(&mut self, command: &str, wait: Duration) -> Result<Value> {
        if !self.in_sync {
            self.sync()?;
        }
        let request = json!({ "execute": command });
        tracing::debug!(target: "qga", "-> {request}");
        self.conn.send(format!("{request}\n").as_bytes())?;
        let result = self.reply(Instant::now() + wait, &format!("the reply to {command}"));
        if result.is_err() {
            // A late reply may still come: resynchronise before the next command.
            self.in_sync = false;
        }
        result?.map_err(|(class, desc)| QmpError::Command {
            command: command.to_string(),
            class,
            desc,
        })
    }

    pub fn ping(&mut self) -> Result<()> {
        self.call("guest-ping", self.timeout).map(drop)
    }

    /// Whether the agent offers an enabled `guest-fsfreeze-freeze`.
    pub fn can_freeze(&mut self) -> Result<bool> {
        let info = self.call("guest-info", self.timeout)?;
        Ok(info["supported_commands"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["name"] == "guest-fsfreeze-freeze" && c["enabled"] != false))
    }

    pub fn status(&mut self) -> Result<FreezeState> {
        let v = self.call("guest-fsfreeze-status", self.timeout)?;
        match v.as_str() {
            Some("thawed") => Ok(FreezeState::Thawed),
            Some("frozen") => Ok(FreezeState::Frozen),
            _ => Err(QmpError::Protocol {
                addr: self.conn.addr.clone(),
                problem: format!("unexpected freeze status {v}"),
            }),
        }
    }

    /// Freezes the guest's file systems and returns how many were frozen. A freeze that fails
    /// or does not answer within `wait` is followed by a thaw before the error is returned.
    pub fn freeze(&mut self, wait: Duration) -> Result<u64> {
        match self.call("guest-fsfreeze-freeze", wait) {
            Ok(v) => v.as_u64().ok_or_else(|| QmpError::Protocol {
                addr: self.conn.addr.clone(),
                problem: format!("unexpected freeze result {v}"),
            }),
            Err(e) => {
                if let Err(thaw) = self.thaw() {
                    tracing::error!("thaw after a failed freeze failed too: {thaw}");
                }
                Err(e)
            }
        }
    }

    pub fn thaw(&mut self) -> Result<u64> {
        let v = self.call("guest-fsfreeze-thaw", self.timeout)?;
        Ok(v.as_u64().unwrap_or(0))
    }
}
