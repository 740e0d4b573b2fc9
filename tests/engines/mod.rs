//! What the engine-simulator tests share (tests/sim.rs, tests/proxy.rs): starting
//! `kvpool-sim` with a small shape, HTTP/1.1 by hand over a `TcpStream`, reading a stream of
//! server-sent events as it arrives, and typed reads of JSON answers.

#![allow(dead_code)]

use std::path::PathBuf;

use kvpool_tests::{kvpool_bin, Proc};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// A small Llama-like shape (4 layers, 2 KV heads, head dim 64, bf16, 16-token blocks: 32 KiB
/// per block object), so a test moves little data but every layer and K/V is checked.
pub const SHAPE: &[&str] = &[
    "--layers",
    "4",
    "--kv-heads",
    "2",
    "--head-dim",
    "64",
    "--dtype-bytes",
    "2",
    "--block-size",
    "16",
    "--blocks",
    "64",
    "--model",
    "test/llama-tiny",
];
pub const BS: usize = 16;
/// Bytes of one block across all layers, K and V: what `verified_bytes` counts per block.
pub const BLOCK_BYTES: u64 = 4 * 2 * 16 * 2 * 64 * 2;

/// `kvpool-sim` next to the `kvpool` binary (`cargo build --bins` builds both), or
/// `$KVPOOL_SIM_BIN`.
pub fn sim_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KVPOOL_SIM_BIN") {
        return PathBuf::from(p);
    }
    let bin = kvpool_bin().with_file_name("kvpool-sim");
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build --bins`)",
        bin.display()
    );
    bin
}

/// A simulator against `master` with the test shape and `extra` flags (which replace the
/// shape's flag of the same name: clap refuses a flag given twice).
pub fn sim(master: &str, extra: &[&str]) -> Proc {
    let mut args = vec!["--master", master, "--listen", "127.0.0.1:0"];
    for pair in SHAPE.chunks(2) {
        if !extra.contains(&pair[0]) {
            args.extend_from_slice(pair);
        }
    }
    args.extend_from_slice(extra);
    Proc::start_program(&sim_bin(), &args)
}

/// Token ids as a JSON array.
pub fn ids(tokens: &[u32]) -> String {
    serde_json::to_string(tokens).expect("token ids as JSON")
}

/// One HTTP/1.1 request; the status and the body parsed as JSON (a body that is not JSON comes
/// back as a string, so a test can still print it).
pub async fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, Value) {
    let mut s = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("send request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read response");
    let text = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP header end");
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    let json = serde_json::from_str(&body).unwrap_or(Value::String(body));
    (status, json)
}

pub fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).expect("chunk length");
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

pub async fn complete(addr: &str, body: &str) -> Value {
    let (status, j) = http(addr, "POST", "/v1/completions", body).await;
    assert_eq!(status, 200, "completion failed: {j}");
    j
}

/// A plain completion of `tokens`; returns the response's `kvpool` report and the response.
pub async fn ask(addr: &str, tokens: &[u32]) -> Value {
    complete(
        addr,
        &format!(r#"{{"prompt": {}, "max_tokens": 4}}"#, ids(tokens)),
    )
    .await
}

pub async fn stats(addr: &str) -> Value {
    let (status, j) = http(addr, "GET", "/stats", "").await;
    assert_eq!(status, 200, "{j}");
    j
}

/// Asserts where a response's KV came from, and that every loaded byte was right.
pub fn assert_kv(r: &Value, blocks: u64, loaded: u64) {
    let k = &r["kvpool"];
    assert_eq!(k["mismatched_blocks"].u(), 0, "wrong bytes loaded: {r}");
    assert_eq!(k["blocks"].u(), blocks, "{r}");
    assert_eq!(k["loaded_blocks"].u(), loaded, "{r}");
    assert_eq!(k["computed_blocks"].u(), blocks - loaded, "{r}");
    assert_eq!(k["verified_bytes"].u(), loaded * BLOCK_BYTES, "{r}");
}

/// Typed reads of a response field that panic with the value when it has another type.
pub trait Field {
    fn u(&self) -> u64;
    fn b(&self) -> bool;
    fn s(&self) -> &str;
}

impl Field for Value {
    fn u(&self) -> u64 {
        self.as_u64()
            .unwrap_or_else(|| panic!("not an unsigned integer: {self}"))
    }

    fn b(&self) -> bool {
        self.as_bool()
            .unwrap_or_else(|| panic!("not a boolean: {self}"))
    }

    fn s(&self) -> &str {
        self.as_str()
            .unwrap_or_else(|| panic!("not a string: {self}"))
    }
}

/// One HTTP/1.1 request like [`http`], also returning the response head (status line and
/// headers, lower-cased) so a test can read the proxy's `x-kvpool-*` headers.
pub async fn http_head(addr: &str, method: &str, path: &str, body: &str) -> (u16, String, Value) {
    let mut s = Stream::open(addr, method, path, body).await;
    let text = s.rest().await;
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (s.status, s.head.clone(), json)
}

/// The value of header `name` (lower case) in a head from [`http_head`] or [`Stream`].
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == name).then(|| v.trim())
    })
}

/// A response read as it arrives: its head at once, then its body one server-sent event at a
/// time (de-chunked), so a test sees an event before the sender has sent the next.
pub struct Stream {
    s: TcpStream,
    pub status: u16,
    /// The status line and headers, lower-cased.
    pub head: String,
    raw: Vec<u8>,
    body: Vec<u8>,
    chunked: bool,
    eof: bool,
    done: bool,
}

impl Stream {
    /// Sends one request (`Connection: close`) and reads the response head.
    pub async fn open(addr: &str, method: &str, path: &str, body: &str) -> Stream {
        let mut s = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.expect("send request");
        let mut st = Stream {
            s,
            status: 0,
            head: String::new(),
            raw: Vec::new(),
            body: Vec::new(),
            chunked: false,
            eof: false,
            done: false,
        };
        let end = loop {
            if let Some(i) = st.raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            assert!(
                st.read().await,
                "connection closed before the response head"
            );
        };
        st.head = String::from_utf8_lossy(&st.raw[..end]).to_ascii_lowercase();
        st.raw.drain(..end + 4);
        st.status = st
            .head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line: {}", st.head));
        st.chunked = header(&st.head, "transfer-encoding") == Some("chunked");
        st.pump();
        st
    }

    /// Reads more bytes; false at end of stream.
    async fn read(&mut self) -> bool {
        let mut buf = [0u8; 16 << 10];
        let n = self.s.read(&mut buf).await.expect("read response");
        self.raw.extend_from_slice(&buf[..n]);
        if n == 0 {
            self.eof = true;
        }
        n > 0
    }

    /// Moves whole chunks (or, unchunked, everything) from `raw` to `body`.
    fn pump(&mut self) {
        if !self.chunked {
            self.body.append(&mut self.raw);
            return;
        }
        while !self.done {
            let Some(i) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let len = std::str::from_utf8(&self.raw[..i])
                .ok()
                .and_then(|l| usize::from_str_radix(l.trim(), 16).ok())
                .unwrap_or_else(|| panic!("bad chunk length: {:?}", &self.raw[..i]));
            if len == 0 {
                self.done = true;
                return;
            }
            if self.raw.len() < i + 2 + len + 2 {
                return;
            }
            self.body.extend_from_slice(&self.raw[i + 2..i + 2 + len]);
            self.raw.drain(..i + 2 + len + 2);
        }
    }

    /// Whether a chunked body ended with its terminating chunk (not cut short).
    pub fn ended_cleanly(&self) -> bool {
        self.done
    }

    fn finished(&self) -> bool {
        self.done || self.eof
    }

    /// The next server-sent event (`data: ...\n\n`, terminator included), or `None` at the
    /// end of the body.
    pub async fn next_event(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.body.windows(2).position(|w| w == b"\n\n") {
                let e: Vec<u8> = self.body.drain(..i + 2).collect();
                return Some(String::from_utf8(e).expect("utf-8 event"));
            }
            if self.finished() {
                return None;
            }
            self.read().await;
            self.pump();
        }
    }

    /// The rest of the body.
    pub async fn rest(&mut self) -> String {
        while !self.finished() {
            self.read().await;
            self.pump();
        }
        String::from_utf8(std::mem::take(&mut self.body)).expect("utf-8 body")
    }
}

/// The JSON payloads of a body of server-sent events (`[DONE]` left out) and whether it ended
/// with `data: [DONE]`.
pub fn events(body: &str) -> (Vec<Value>, bool) {
    let mut out = Vec::new();
    let mut done = false;
    for e in body.split("\n\n").filter(|e| !e.is_empty()) {
        let data = e
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("not a data event: {e:?}"));
        assert!(!done, "an event after [DONE]: {e:?}");
        if data == "[DONE]" {
            done = true;
        } else {
            out.push(serde_json::from_str(data).unwrap_or_else(|e| panic!("{data}: {e}")));
        }
    }
    (out, done)
}
