//! A minimal HTTP/1.1 GET for the servers' `/metrics`, `/health` and `/ready` (the tests need
//! nothing more than a status and a body, so no HTTP client crate); the text format is read by
//! `kvpool_ops::scrape`, as `kvpool top` reads it.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

pub use kvpool_ops::scrape::Samples;

/// `GET path` on `addr`: the status code and the body. Panics if the server does not answer.
pub fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text)
        .unwrap_or_else(|e| panic!("GET {addr}{path}: {e}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("GET {addr}{path}: no status in {head:?}"));
    assert!(
        !head.to_ascii_lowercase().contains("chunked"),
        "the servers send whole bodies with a Content-Length"
    );
    (code, body.to_string())
}

/// `/metrics` parsed into `series → value` (`name{labels}` exactly as exported).
pub fn scrape(addr: &str) -> Samples {
    let (code, body) = get(addr, "/metrics");
    assert_eq!(code, 200, "/metrics answered {code}: {body}");
    assert!(
        body.ends_with("# EOF\n"),
        "/metrics does not end with # EOF"
    );
    kvpool_ops::scrape::parse(&body)
}

/// The value of one series, 0 when absent.
pub fn value(m: &Samples, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

/// The metric names a scrape exports: those of its samples, and those its `# TYPE` lines
/// declare (a labelled family with no series yet, such as an error counter before the first
/// error, exports only its declaration), as the series names Prometheus stores
/// (`_total` for counters, `_bucket`, `_sum` and `_count` for histograms).
pub fn names(addr: &str) -> std::collections::BTreeSet<String> {
    let (code, body) = get(addr, "/metrics");
    assert_eq!(code, 200, "/metrics answered {code}: {body}");
    let mut out: std::collections::BTreeSet<String> = kvpool_ops::scrape::parse(&body)
        .keys()
        .map(|s| s.split('{').next().unwrap_or(s).to_string())
        .collect();
    for line in body.lines() {
        let mut w = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (w.next(), w.next(), w.next(), w.next())
        {
            match kind {
                "counter" => {
                    out.insert(format!("{name}_total"));
                }
                "histogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        out.insert(format!("{name}{suffix}"));
                    }
                }
                _ => {
                    out.insert(name.to_string());
                }
            }
        }
    }
    out
}
