//! Where a QMP or guest-agent socket lives: a unix socket path, or `tcp:HOST:PORT` where HOST
//! may be a name, an IPv4 address or a bracketed IPv6 address (`tcp:[::1]:4444`).

use super::error::QmpError;
use std::fmt;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

impl Address {
    pub fn parse(s: &str) -> Result<Address, QmpError> {
        let bad = |why: &str| QmpError::Address(s.to_string(), why.to_string());
        let Some(rest) = s.strip_prefix("tcp:") else {
            if s.is_empty() {
                return Err(bad("empty"));
            }
            return Ok(Address::Unix(PathBuf::from(s)));
        };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, tail) = v6.split_once(']').ok_or_else(|| bad("missing ']'"))?;
            let port = tail
                .strip_prefix(':')
                .ok_or_else(|| bad("expected ':PORT' after ']'"))?;
            (host, port)
        } else {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| bad("expected tcp:HOST:PORT"))?;
            if host.contains(':') {
                return Err(bad("write IPv6 addresses in brackets: tcp:[::1]:4444"));
            }
            (host, port)
        };
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        let port = port
            .parse()
            .map_err(|_| bad("port is not a number 0-65535"))?;
        Ok(Address::Tcp {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "{}", p.display()),
            Address::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unix_and_tcp_forms() {
        assert_eq!(
            Address::parse("/run/vm.sock").unwrap(),
            Address::Unix("/run/vm.sock".into())
        );
        assert_eq!(
            Address::parse("tcp:localhost:4444").unwrap(),
            Address::Tcp {
                host: "localhost".into(),
                port: 4444
            }
        );
        let v6 = Address::parse("tcp:[::1]:4444").unwrap();
        assert_eq!(
            v6,
            Address::Tcp {
                host: "::1".into(),
                port: 4444
            }
        );
        assert_eq!(v6.to_string(), "tcp:[::1]:4444");
        for bad in [
            "",
            "tcp:",
            "tcp:host",
            "tcp:::1:4444",
            "tcp:[::1]4444",
            "tcp:h:99999",
        ] {
            assert!(Address::parse(bad).is_err(), "{bad}");
        }
    }
}
