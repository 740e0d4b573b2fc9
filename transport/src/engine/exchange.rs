//! The on-the-wire exchanges: a write request's head and payloads out in vectored writes, a
//! read response's payloads in with vectored reads, and the per-op results of either.

use std::io::IoSliceMut;

use kvpool_proto::{
    decode_body, header::FLAG_STREAMED, ErrorCode, FrameHeader, FrameLimits, ItemResult, Read,
    ReadStatus, UnitResponse, WireError, Write,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

use super::{chunk::Chunk, EngineOptions, DIRECT_READ_MIN};
use crate::{
    dataplane::{advance, write_all_gathered, MAX_IOVECS},
    frame, TransportError,
};

/// Read buffer for a response's header, body and small payloads: at most this much ...
const RESPONSE_BUF: usize = 256 << 10;
/// ... and room for a read response's head beyond its small payloads.
const HEAD_ROOM: usize = 16 << 10;

/// The message of one request for chunks with slices `P`, and how its exchange runs. The
/// exchange borrows the chunks rather than taking them, so a failed attempt on a pooled
/// connection can run again on a fresh one.
pub(super) trait Exchange<P> {
    /// What each successful op yields.
    type Value;
    /// Names the exchange in errors.
    const OP: &'static str;

    /// Sends the request as `id` on `conn` and reads its per-op results; gives `conn` back
    /// for the pool once the response is read in full.
    async fn exchange(
        &self,
        conn: TcpStream,
        id: u64,
        chunks: &mut [Chunk<P>],
        opts: &EngineOptions,
    ) -> Result<(TcpStream, Vec<ItemResult<Self::Value>>), TransportError>;
}

/// Sends the head and every chunk's slices in vectored writes, then reads the per-op results.
impl<'a> Exchange<&'a [u8]> for Write {
    type Value = ();
    const OP: &'static str = "write";

    async fn exchange(
        &self,
        mut conn: TcpStream,
        id: u64,
        chunks: &mut [Chunk<&'a [u8]>],
        opts: &EngineOptions,
    ) -> Result<(TcpStream, Vec<ItemResult<()>>), TransportError> {
        let payload: u64 = chunks.iter().map(|c| c.len as u64).sum();
        let head = frame::encode_request(id, self, payload);
        let bufs: Vec<&[u8]> = std::iter::once(head.as_slice())
            .chain(chunks.iter().flat_map(|c| c.bufs.iter().copied()))
            .collect();
        write_all_gathered(&mut conn, &bufs).await?;
        let resp = read_unit_response(&mut conn, &opts.limits, id, chunks.len()).await?;
        Ok((conn, resp))
    }
}

/// Sends the request (asking for a streamed answer), then lands each successful op's payload
/// in its chunk's slices; an op's value is the crc32c of its bytes (0 unless
/// `checksum_reads`). A streamed answer (the node sends each op as soon as it is read, its
/// status after its bytes) and a plain one (from a node that predates streaming) are told
/// apart by the response's `FLAG_STREAMED`.
impl<'a> Exchange<&'a mut [u8]> for Read {
    type Value = u32;
    const OP: &'static str = "read";

    async fn exchange(
        &self,
        mut conn: TcpStream,
        id: u64,
        chunks: &mut [Chunk<&'a mut [u8]>],
        opts: &EngineOptions,
    ) -> Result<(TcpStream, Vec<ItemResult<u32>>), TransportError> {
        conn.write_all(&frame::encode_request_flagged(id, self, 0, FLAG_STREAMED))
            .await?;
        // Buffered, so a batch of small payloads costs a few syscalls instead of one each;
        // large chunks still go straight into their slices (`read_chunk`). The response is
        // the only thing on the wire, so nothing read ahead is lost when the reader is dropped.
        // Sized to what it can hold of this response (tokio zeroes it on creation, and a
        // 64 KiB get paid for zeroing 256 KiB): the head and the small chunks' payloads.
        let small: usize = chunks
            .iter()
            .map(|c| c.len)
            .filter(|&n| n < DIRECT_READ_MIN)
            .sum();
        let cap = HEAD_ROOM
            .saturating_add(small)
            .saturating_add(chunks.len() * ReadStatus::LEN)
            .min(RESPONSE_BUF);
        let mut rd = BufReader::with_capacity(cap, &mut conn);
        let header = read_reply_header(&mut rd, &opts.limits, id).await?;
        let body = frame::read_body(&mut rd, header.body_len).await?;
        let resp: Vec<ItemResult<()>> = match frame::decode_response::<UnitResponse>(&header, &body)
        {
            Ok(r) => r.items,
            Err(TransportError::Remote(w)) if header.payload_len == 0 => {
                // The whole request was refused; the connection is still in step.
                vec![Err(w); chunks.len()]
            }
            Err(e) => return Err(e),
        };
        check_count(resp.len(), chunks.len())?;
        let streamed = header.is_streamed();
        let admitted = chunks
            .iter()
            .zip(&resp)
            .filter(|(_, r)| r.is_ok())
            .map(|(c, _)| c.len as u64);
        let expected = if streamed {
            ReadStatus::payload_len(admitted)
        } else {
            admitted.sum()
        };
        if header.payload_len != expected {
            return Err(TransportError::Protocol(format!(
                "payload of {} bytes, expected {expected}",
                header.payload_len
            )));
        }
        let mut out = Vec::with_capacity(chunks.len());
        for (c, r) in chunks.iter_mut().zip(resp) {
            if let Err(e) = r {
                out.push(Err(e));
                continue;
            }
            let mut status = [0u8; ReadStatus::LEN];
            if streamed {
                // The status lands with the bytes before it, in the same vectored reads.
                let mut bufs: Vec<&mut [u8]> = c
                    .bufs
                    .iter_mut()
                    .map(|b| &mut **b)
                    .chain(std::iter::once(&mut status[..]))
                    .collect();
                read_scattered(&mut rd, &mut bufs, c.len + ReadStatus::LEN).await?;
                drop(bufs);
                let ReadStatus(code) = ReadStatus::decode(status);
                if code != ErrorCode::Ok {
                    // The bytes just read are filler; the node logged why.
                    out.push(Err(WireError::new(
                        code,
                        format!(
                            "the node could not read this op after its answer began ({code:?})"
                        ),
                    )));
                    continue;
                }
            } else {
                read_chunk(&mut rd, c).await?;
            }
            out.push(Ok(if opts.checksum_reads {
                kvpool_proto::crc32c::crc32c_parts(c.bufs.iter())
            } else {
                0
            }));
        }
        drop(rd);
        Ok((conn, out))
    }
}

/// Fills a chunk's slices, in order, from the response: first what the buffer read ahead,
/// then, if at least [`DIRECT_READ_MIN`] bytes are still to come, straight from the socket
/// with vectored reads (the buffer is empty then, so the byte order holds); otherwise through
/// the buffer.
pub(super) async fn read_chunk(
    rd: &mut BufReader<&mut TcpStream>,
    c: &mut Chunk<&mut [u8]>,
) -> Result<(), TransportError> {
    read_scattered(rd, &mut c.bufs, c.len).await
}

/// [`read_chunk`] of `len` bytes into `bufs` (which they fill exactly).
async fn read_scattered(
    rd: &mut BufReader<&mut TcpStream>,
    bufs: &mut [&mut [u8]],
    len: usize,
) -> Result<(), TransportError> {
    let mut left = len;
    // Position: the first unfilled byte is `bufs[at][skip]`.
    let (mut at, mut skip) = (0, 0);
    while at < bufs.len() && !rd.buffer().is_empty() {
        let buffered = rd.buffer();
        let dst = &mut bufs[at][skip..];
        let n = buffered.len().min(dst.len());
        dst[..n].copy_from_slice(&buffered[..n]);
        rd.consume(n);
        left -= n;
        skip += n;
        if skip == bufs[at].len() {
            at += 1;
            skip = 0;
        }
    }
    if left == 0 {
        return Ok(());
    }
    if left < DIRECT_READ_MIN {
        frame::read_payload_into(rd, &mut bufs[at][skip..]).await?;
        for b in &mut bufs[at + 1..] {
            frame::read_payload_into(rd, b).await?;
        }
        return Ok(());
    }
    let conn: &TcpStream = rd.get_mut();
    while at < bufs.len() {
        let (first, rest) = bufs[at..].split_at_mut(1);
        let mut iov: Vec<IoSliceMut<'_>> = std::iter::once(IoSliceMut::new(&mut first[0][skip..]))
            .chain(
                rest.iter_mut()
                    .take(MAX_IOVECS - 1)
                    .map(|b| IoSliceMut::new(b)),
            )
            .collect();
        let n = loop {
            conn.readable().await?;
            match conn.try_read_vectored(&mut iov) {
                Ok(0) => return Err(TransportError::Truncated),
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        };
        advance(|i| bufs[i].len(), bufs.len(), (&mut at, &mut skip), n);
    }
    Ok(())
}

async fn read_unit_response(
    conn: &mut TcpStream,
    limits: &FrameLimits,
    id: u64,
    ops: usize,
) -> Result<Vec<ItemResult<()>>, TransportError> {
    let header = read_reply_header(conn, limits, id).await?;
    if header.payload_len != 0 {
        return Err(TransportError::Protocol(
            "payload on a write response".into(),
        ));
    }
    let body = frame::read_body(conn, header.body_len).await?;
    let items = match header.code() {
        ErrorCode::Ok => {
            decode_body::<UnitResponse>(&body)
                .map_err(TransportError::Remote)?
                .items
        }
        code => vec![
            Err(WireError::new(
                code,
                String::from_utf8_lossy(&body).into_owned()
            ));
            ops
        ],
    };
    check_count(items.len(), ops)?;
    Ok(items)
}

/// Reads the header of the response to request `id`.
async fn read_reply_header<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    limits: &FrameLimits,
    id: u64,
) -> Result<FrameHeader, TransportError> {
    let header = frame::read_header(rd, limits)
        .await?
        .ok_or(TransportError::Closed)?;
    if !header.is_response() || header.request_id != id {
        return Err(TransportError::Protocol(format!(
            "response id {} for request {id}",
            header.request_id
        )));
    }
    Ok(header)
}

fn check_count(results: usize, ops: usize) -> Result<(), TransportError> {
    if results != ops {
        return Err(TransportError::Protocol(format!(
            "{results} results for {ops} ops"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::pattern;
    use kvpool_proto::SegmentId;

    /// Gathered writes and scattered reads over a real socket: more slices than one syscall
    /// takes, odd sizes, a scatter shape unlike the gather shape, and bytes already in the
    /// response buffer when the chunk starts.
    #[tokio::test]
    async fn gathered_writes_land_in_a_different_scatter_shape() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sizes: Vec<usize> = (0..3000)
            .map(|i| [1, 4095, 0, 700, 32 << 10][i % 5])
            .collect();
        let src: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| pattern(n, i as u8))
            .collect();
        let all = src.concat();
        // A second chunk, small enough to be read through the buffer.
        let tail = pattern(5000, 77);
        let writer = async {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            let prefix = b"head";
            let mut bufs: Vec<&[u8]> = vec![prefix];
            bufs.extend(src.iter().map(Vec::as_slice));
            bufs.push(&tail);
            write_all_gathered(&mut conn, &bufs).await.unwrap();
        };
        let reader = async {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut dst = vec![0u8; all.len()];
            // Scatter shape: 13 bytes, then 100 KiB pieces, then the rest.
            let (first, rest) = dst.split_at_mut(13);
            let mut bufs: Vec<&mut [u8]> = vec![first];
            bufs.extend(rest.chunks_mut(100 << 10));
            let mut c = Chunk {
                item: 0,
                seq: 0,
                segment: SegmentId(0),
                offset: 0,
                len: all.len(),
                bufs,
            };
            let mut rd = BufReader::with_capacity(RESPONSE_BUF, &mut conn);
            let mut head = [0u8; 4];
            frame::read_payload_into(&mut rd, &mut head).await.unwrap();
            assert_eq!(&head, b"head");
            read_chunk(&mut rd, &mut c).await.unwrap();
            let crc = kvpool_proto::crc32c::crc32c_parts(c.bufs.iter());
            assert_eq!(crc, kvpool_proto::crc32c::crc32c(&all));
            drop(c);
            assert!(dst == all, "bytes differ");
            let mut small = vec![0u8; tail.len()];
            let (a, b) = small.split_at_mut(1);
            let (b, d) = b.split_at_mut(4095);
            let mut c = Chunk {
                item: 0,
                seq: 1,
                segment: SegmentId(0),
                offset: 0,
                len: tail.len(),
                bufs: vec![a, b, d],
            };
            read_chunk(&mut rd, &mut c).await.unwrap();
            drop(c);
            assert!(small == tail, "small chunk differs");
        };
        tokio::join!(writer, reader);
    }
}
