//! The QMP client: greeting, capability negotiation, commands matched to their replies by id,
//! and a queue for the events that arrive in between.

use super::addr::Address;
use super::error::{QmpError, Result};
use super::message::{parse, Event, Message};
use super::stream::Conn;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

/// QEMU's version from the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Version {
    pub major: u64,
    pub minor: u64,
    pub micro: u64,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

pub struct Qmp {
    conn: Conn,
    next_id: u64,
    events: VecDeque<Event>,
    /// How long a command may take to be answered.
    pub timeout: Duration,
    pub version: Version,
    /// The distribution's package string, e.g. `Debian 1:10.0.2+ds-2`.
    pub package: String,
}

impl Qmp {
    /// Connects, reads the greeting (within `timeout`: a socket that already serves another
    /// client never greets) and negotiates capabilities.
    pub fn connect(addr: &Address, timeout: Duration) -> Result<Qmp> {
        let mut conn = Conn::connect(addr, timeout)?;
        let line = conn.line(Instant::now() + timeout, "the QMP greeting", timeout)?;
        let greeting = match parse(&line) {
            Ok(Message::Greeting(g)) => g,
            Ok(other) => {
                return Err(protocol(
                    &conn.addr,
                    format!("expected the greeting, got {other:?}"),
                ))
            }
            Err(e) => return Err(protocol(&conn.addr, e)),
        };
        let v = &greeting["version"]["qemu"];
        let num = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        let mut qmp = Qmp {
            conn,
            next_id: 1,
            events: VecDeque::new(),
            timeout,
            version: Version {
                major: num("major"),
                minor: num("minor"),
                micro: num("micro"),
            },
            package: greeting["version"]["package"]
                .as_str()
                .unwrap_or("")
                .trim()
                .to_string(),
        };
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    pub fn addr(&self) -> &str {
        &self.conn.addr
    }

    /// Runs `command` and returns its `return` value. Events that arrive before the reply are
    /// queued for [`Qmp::next_event`].
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({"execute": command, "id": id});
        if arguments.as_object().is_some_and(|a| !a.is_empty()) {
            request["arguments"] = arguments;
        }
        let text = request.to_string();
        tracing::debug!(target: "qmp", "-> {text}");
        self.conn.send(format!("{text}\n").as_bytes())?;
        let deadline = Instant::now() + self.timeout;
        let what = format!("the reply to {command}");
        loop {
            let line = self.conn.line(deadline, &what, self.timeout)?;
            tracing::debug!(target: "qmp", "<- {}", String::from_utf8_lossy(&line));
            match parse(&line).map_err(|e| protocol(&self.conn.addr, e))? {
                Message::Event(e) => self.events.push_back(e),
                Message::Return { id: Some(r), value } if r == json!(id) => return Ok(value),
                // An error without id answers a request QEMU could not parse: ours.
                Message::Error { id: r, class, desc } if r.is_none() || r == Some(json!(id)) => {
                    return Err(QmpError::Command {
                        command: command.to_string(),
                        class,
                        desc,
                    })
                }
                other => tracing::debug!(target: "qmp", "ignoring stale message {other:?}"),
            }
        }
    }

    /// Forgets every event QEMU sent before now (a round trip makes sure they have all been
    /// read): what follows is about commands sent after this call.
    pub fn drop_events(&mut self) -> Result<()> {
        self.execute("query-status", json!({}))?;
        self.events.clear();
        Ok(())
    }

    /// The next event: a queued one, or one read within `wait`. `None` when none arrived.
    pub fn next_event(&mut self, wait: Duration) -> Result<Option<Event>> {
        if let Some(e) = self.events.pop_front() {
            return Ok(Some(e));
        }
        let deadline = Instant::now() + wait;
        loop {
            let Some(line) = self.conn.read_until(b'\n', deadline, "events")? else {
                return Ok(None);
            };
            tracing::debug!(target: "qmp", "<- {}", String::from_utf8_lossy(&line));
            match parse(&line).map_err(|e| protocol(&self.conn.addr, e))? {
                Message::Event(e) => return Ok(Some(e)),
                other => tracing::debug!(target: "qmp", "ignoring stale message {other:?}"),
            }
        }
    }
}

fn protocol(addr: &str, problem: String) -> QmpError {
    QmpError::Protocol {
        addr: addr.to_string(),
        problem,
    }
}
