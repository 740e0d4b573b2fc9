//! The reading side: fetch a server's `/metrics` and parse the text format into series
//! values. Used by `kvpool top` and by the end-to-end tests, so both read metrics one way.

use std::{collections::BTreeMap, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Series (`name{labels}` exactly as exported) and their values.
pub type Samples = BTreeMap<String, f64>;

/// Parses the text format: every sample line; comments, `# EOF` and malformed lines are
/// skipped (a scrape is a view, not a contract to enforce here).
pub fn parse(text: &str) -> Samples {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The sum of every series of metric `name` (all label sets), 0 when there is none.
pub fn sum(samples: &Samples, name: &str) -> f64 {
    samples
        .iter()
        .filter(|(s, _)| s.split('{').next() == Some(name))
        .map(|(_, v)| v)
        .sum()
}

/// `GET path` on `addr` over HTTP/1.1: the status code and the body. Small bodies only
/// (metrics, probes), read to the end of the connection within `timeout`.
pub async fn get(addr: &str, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    tokio::time::timeout(timeout, get_inner(addr, path))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time"))?
}

async fn get_inner(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer");
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Ok((
        code,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    ))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || n > rest.len() {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_samples_and_sums_families() {
        let s = parse("# HELP x y\nx_total{op=\"a\"} 2\nx_total{op=\"b\"} 3.5\ny 1\n# EOF\n");
        assert_eq!(s.len(), 3);
        assert_eq!(sum(&s, "x_total"), 5.5);
        assert_eq!(sum(&s, "y"), 1.0);
        assert_eq!(sum(&s, "z"), 0.0);
    }

    #[test]
    fn dechunks() {
        assert_eq!(dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
    }
}
