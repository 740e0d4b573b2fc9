//! Checking the addresses an operator types (etcd endpoints, advertised addresses) at start,
//! so a typo is refused with its value named instead of being retried forever as if the
//! peer were only unreachable. Pure string checks: nothing here resolves or dials.

use std::net::Ipv6Addr;

/// Why an address was refused; the message quotes the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error(
        "{value:?} is not HOST:PORT (a host name, an IPv4 address or [IPv6], then a port 1-65535)"
    )]
    NotHostPort { value: String },
    #[error("{value:?}: https etcd endpoints need TLS, which this build does not include; use http://HOST:PORT")]
    NoTls { value: String },
    #[error("{value:?}: unsupported scheme (an etcd endpoint is HOST:PORT or http://HOST:PORT)")]
    Scheme { value: String },
}

/// Checks `HOST:PORT`: a DNS name or IPv4 address, or a bracketed IPv6 address, and a port in
/// 1..=65535. A port is required: every kvpool and etcd address has a non-default one.
pub fn check_host_port(value: &str) -> Result<(), AddrError> {
    let bad = || AddrError::NotHostPort {
        value: value.to_string(),
    };
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 && !port.starts_with('+') => {}
        _ => return Err(bad()),
    }
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<Ipv6Addr>().is_ok(),
        None => is_dns_name(host),
    };
    host_ok.then_some(()).ok_or_else(bad)
}

/// Letters, digits, '-' and '_' in dot-separated labels of 1..=63 characters (an IPv4
/// address is such a name too); no label starts or ends with '-'.
fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Checks an etcd endpoint as the etcd client takes it: `HOST:PORT` or `http://HOST:PORT`
/// (a trailing '/' allowed). Returns the `HOST:PORT` part.
pub fn check_etcd_endpoint(value: &str) -> Result<&str, AddrError> {
    if value.starts_with("https://") {
        return Err(AddrError::NoTls {
            value: value.to_string(),
        });
    }
    let rest = value.strip_prefix("http://").unwrap_or(value);
    if rest.contains("://") {
        return Err(AddrError::Scheme {
            value: value.to_string(),
        });
    }
    let hp = rest.strip_suffix('/').unwrap_or(rest);
    check_host_port(hp).map_err(|_| AddrError::NotHostPort {
        value: value.to_string(),
    })?;
    Ok(hp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_addresses_pass() {
        for v in [
            "127.0.0.1:2379",
            "etcd-0.etcd.svc:2379",
            "localhost:1",
            "[::1]:2379",
            "[fe80::1]:65535",
            "my_host:80",
        ] {
            assert_eq!(check_host_port(v), Ok(()), "{v}");
        }
        assert_eq!(
            check_etcd_endpoint("http://10.0.0.1:2379/"),
            Ok("10.0.0.1:2379")
        );
        assert_eq!(check_etcd_endpoint("10.0.0.1:2379"), Ok("10.0.0.1:2379"));
    }

    #[test]
    fn typos_are_refused_naming_the_value() {
        for v in [
            "::bad::",
            "",
            ":2379",
            "host",
            "host:",
            "host:0",
            "host:65536",
            "host:+1",
            "host:port",
            "ho st:1",
            "-host:1",
            "a..b:1",
            "[::1:2379",
            "[nope]:1",
            "::1:2379",
            "host:1/path",
            "user@host:1",
        ] {
            let e = check_host_port(v).expect_err(v);
            assert!(e.to_string().contains(&format!("{v:?}")), "{e}");
        }
        for v in [
            "::bad::",
            "http://",
            "http://host",
            "tcp://h:1",
            "http://h:1/x",
        ] {
            let e = check_etcd_endpoint(v).expect_err(v);
            assert!(e.to_string().contains(&format!("{v:?}")), "{e}");
        }
        assert!(matches!(
            check_etcd_endpoint("https://h:1"),
            Err(AddrError::NoTls { .. })
        ));
    }
}
