//! A minimal Redis (RESP2) client: SET and GET, pipelined, on one connection.
//!
//! It is written to move bytes the way the kvpool transfer engine does, so the comparison is
//! of the servers, not of client libraries: small values are gathered into one write with
//! their command, large values go from the caller's slice straight to the socket, and GET
//! replies are read straight into the caller's buffer.

use std::io::Write as _;

use anyhow::{bail, ensure, Context, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
};

/// Values below this are copied into the command buffer (the kvpool engine's threshold too).
const COPY_BELOW: usize = 64 << 10;
/// Reply buffer: many small replies per `read` syscall; large bulk replies bypass it.
const READ_BUF: usize = 256 << 10;

pub struct RespConn {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
    /// Commands being gathered for the next write.
    out: Vec<u8>,
    /// The reply line being parsed.
    line: Vec<u8>,
}

impl RespConn {
    pub async fn connect(addr: &str) -> Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to Redis at {addr}"))?;
        // Latency of a lone request matters as much as throughput; kvpool sets it too.
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        Ok(RespConn {
            r: BufReader::with_capacity(READ_BUF, r),
            w,
            out: Vec::new(),
            line: Vec::new(),
        })
    }

    /// Sends one command and returns its status or integer reply line (without the CRLF).
    pub async fn command(&mut self, args: &[&[u8]]) -> Result<String> {
        self.out.clear();
        push_command(&mut self.out, args);
        self.w.write_all(&self.out).await?;
        self.read_line().await?;
        Ok(String::from_utf8_lossy(&self.line[1..]).into_owned())
    }

    /// SETs every item in one pipeline and checks every reply is `+OK`.
    pub async fn set_many(&mut self, items: &[(&[u8], &[u8])]) -> Result<()> {
        self.out.clear();
        for (key, value) in items {
            push_header(&mut self.out, 3);
            push_bulk(&mut self.out, b"SET");
            push_bulk(&mut self.out, key);
            write!(self.out, "${}\r\n", value.len())?;
            if value.len() < COPY_BELOW {
                self.out.extend_from_slice(value);
            } else {
                self.w.write_all(&self.out).await?;
                self.out.clear();
                self.w.write_all(value).await?;
            }
            self.out.extend_from_slice(b"\r\n");
        }
        self.w.write_all(&self.out).await?;
        for _ in items {
            self.read_line().await?;
            ensure!(
                self.line == b"+OK",
                "SET answered {:?}",
                String::from_utf8_lossy(&self.line)
            );
        }
        Ok(())
    }

    /// GETs every key in one pipeline, each value into its buffer, which must be exactly the
    /// value's length (a miss or another length is an error).
    pub async fn get_many(&mut self, keys: &[&[u8]], dsts: &mut [Vec<u8>]) -> Result<()> {
        self.out.clear();
        for key in keys {
            push_command(&mut self.out, &[b"GET", key]);
        }
        self.w.write_all(&self.out).await?;
        for (key, dst) in keys.iter().zip(dsts.iter_mut()) {
            self.read_line().await?;
            let len = bulk_len(&self.line)
                .with_context(|| format!("GET {}", String::from_utf8_lossy(key)))?;
            ensure!(
                len == dst.len(),
                "GET returned {len} bytes, expected {}",
                dst.len()
            );
            // Large reads skip the BufReader's buffer once it is drained: one copy, like kvpool.
            self.r.read_exact(dst).await?;
            let mut crlf = [0u8; 2];
            self.r.read_exact(&mut crlf).await?;
            ensure!(&crlf == b"\r\n", "bulk reply not terminated by CRLF");
        }
        Ok(())
    }

    /// Reads one reply line into `self.line` without its CRLF; an error reply is an error.
    async fn read_line(&mut self) -> Result<()> {
        self.line.clear();
        let n = self.r.read_until(b'\n', &mut self.line).await?;
        ensure!(
            n >= 3 && self.line.ends_with(b"\r\n"),
            "Redis closed the connection or sent a bad line"
        );
        self.line.truncate(self.line.len() - 2);
        if self.line[0] == b'-' {
            bail!("Redis error: {}", String::from_utf8_lossy(&self.line[1..]));
        }
        Ok(())
    }
}

/// The length announced by a `$LEN` line; a nil (`$-1`) is a miss, reported as an error.
fn bulk_len(line: &[u8]) -> Result<usize> {
    ensure!(
        line.first() == Some(&b'$'),
        "expected a bulk reply, got {:?}",
        String::from_utf8_lossy(line)
    );
    let text = std::str::from_utf8(&line[1..])?;
    ensure!(text != "-1", "key not found");
    Ok(text.parse()?)
}

fn push_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    push_header(out, args.len());
    for a in args {
        push_bulk(out, a);
    }
}

fn push_header(out: &mut Vec<u8>, args: usize) {
    // Writing to a Vec cannot fail.
    let _ = write!(out, "*{args}\r\n");
}

fn push_bulk(out: &mut Vec<u8>, arg: &[u8]) {
    let _ = write!(out, "${}\r\n", arg.len());
    out.extend_from_slice(arg);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_lengths() {
        assert_eq!(bulk_len(b"$4096").unwrap(), 4096);
        assert!(bulk_len(b"$-1").is_err(), "a nil reply is a miss");
        assert!(bulk_len(b"+OK").is_err());
    }

    #[test]
    fn commands_are_resp_arrays() {
        let mut out = Vec::new();
        push_command(&mut out, &[b"GET", b"k1"]);
        assert_eq!(out, b"*2\r\n$3\r\nGET\r\n$2\r\nk1\r\n");
    }
}
