//! The messages QEMU sends on a QMP socket, parsed from one line of JSON.
//!
//! Parsing is separate from the socket so the fuzz target can feed it arbitrary bytes: a
//! hostile or broken peer must produce an error, never a panic.

use serde_json::{Map, Value};

/// An asynchronous event (`BLOCK_JOB_COMPLETED`, `JOB_STATUS_CHANGE`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: String,
    pub data: Value,
}

impl Event {
    /// A string member of `data`, such as a job's `id` or `device`.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.data.get(key).and_then(Value::as_str)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// `{"QMP": {...}}`: the greeting, with the capabilities object.
    Greeting(Value),
    /// A successful reply.
    Return {
        id: Option<Value>,
        value: Value,
    },
    /// A refused command.
    Error {
        id: Option<Value>,
        class: String,
        desc: String,
    },
    Event(Event),
}

/// Parses one line. Errors describe what was wrong, for a protocol error message.
pub fn parse(line: &[u8]) -> Result<Message, String> {
    let value: Value = serde_json::from_slice(line)
        .map_err(|e| format!("invalid JSON ({e}): {}", excerpt(line)))?;
    let Value::Object(mut obj) = value else {
        return Err(format!("not a JSON object: {}", excerpt(line)));
    };
    let id = obj.remove("id");
    if let Some(greeting) = obj.remove("QMP") {
        return Ok(Message::Greeting(greeting));
    }
    if let Some(value) = obj.remove("return") {
        return Ok(Message::Return { id, value });
    }
    if let Some(err) = obj.remove("error") {
        let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        return Ok(Message::Error {
            id,
            class: field("class"),
            desc: field("desc"),
        });
    }
    if let Some(Value::String(name)) = obj.remove("event") {
        let data = obj.remove("data").unwrap_or(Value::Object(Map::new()));
        return Ok(Message::Event(Event { name, data }));
    }
    Err(format!("unknown message: {}", excerpt(line)))
}

fn excerpt(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(&line[..line.len().min(200)]);
    if line.len() > 200 {
        format!("{text}...")
    } else {
        text.into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_each_kind() {
        assert!(matches!(
            parse(br#"{"QMP":{"version":{},"capabilities":["oob"]}}"#),
            Ok(Message::Greeting(_))
        ));
        assert_eq!(
            parse(br#"{"return":{},"id":7}"#).unwrap(),
            Message::Return {
                id: Some(json!(7)),
                value: json!({})
            }
        );
        assert_eq!(
            parse(br#"{"id":1,"error":{"class":"GenericError","desc":"Node name too long"}}"#)
                .unwrap(),
            Message::Error {
                id: Some(json!(1)),
                class: "GenericError".into(),
                desc: "Node name too long".into()
            }
        );
        let Message::Event(e) = parse(
            br#"{"timestamp":{"seconds":1,"microseconds":2},"event":"BLOCK_JOB_COMPLETED","data":{"device":"j","len":5}}"#,
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            (e.name.as_str(), e.str("device")),
            ("BLOCK_JOB_COMPLETED", Some("j"))
        );
        for bad in [&b"[]"[..], b"{", b"{\"event\":1}", b"{}", b"\xff"] {
            assert!(parse(bad).is_err());
        }
    }
}
