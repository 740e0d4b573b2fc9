//! Reading and writing frames on any async byte stream.
//!
//! These helpers are the only place that turns a stream into headers, bodies and payloads.
//! Payloads are never buffered here: callers read them straight into their destination
//! (a segment, a caller's buffer) with [`read_payload_into`] or skip them with
//! [`discard`], which is what keeps the data path free of intermediate copies.

use kvpool_proto::{
    decode_body, encode_body, ErrorCode, FrameHeader, FrameLimits, HeaderError, Message, WireError,
    HEADER_LEN,
};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::TransportError;

/// Reads one header. `Ok(None)` is a clean end of stream between frames.
pub async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: &FrameLimits,
) -> Result<Option<FrameHeader>, TransportError> {
    let mut buf = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        let n = r.read(&mut buf[filled..]).await?;
        if n == 0 {
            if filled == 0 {
                return Ok(None);
            }
            return Err(TransportError::Truncated);
        }
        filled += n;
    }
    FrameHeader::decode(&buf, limits)
        .map(Some)
        .map_err(TransportError::Header)
}

/// Checks a header decoded without limits against the server's `limits` (decoding first
/// lets the refusal carry the frame's request id and opcode).
pub fn check_limits(h: &FrameHeader, limits: &FrameLimits) -> Result<(), HeaderError> {
    if h.body_len > limits.max_body {
        return Err(HeaderError::BodyTooLarge {
            len: h.body_len,
            max: limits.max_body,
        });
    }
    if h.payload_len > limits.max_payload {
        return Err(HeaderError::PayloadTooLarge {
            len: h.payload_len,
            max: limits.max_payload,
        });
    }
    Ok(())
}

/// Reads exactly `len` bytes of body.
pub async fn read_body<R: AsyncRead + Unpin>(
    r: &mut R,
    len: u32,
) -> Result<Vec<u8>, TransportError> {
    let mut body = vec![0u8; len as usize];
    read_exact(r, &mut body).await?;
    Ok(body)
}

/// Reads exactly `dst.len()` payload bytes into `dst`.
pub async fn read_payload_into<R: AsyncRead + Unpin>(
    r: &mut R,
    dst: &mut [u8],
) -> Result<(), TransportError> {
    read_exact(r, dst).await
}

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, dst: &mut [u8]) -> Result<(), TransportError> {
    match r.read_exact(dst).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(TransportError::Truncated),
        Err(e) => Err(e.into()),
    }
}

/// Skips `len` bytes (the payload of a refused request), keeping the stream in step.
pub async fn discard<R: AsyncRead + Unpin>(r: &mut R, mut len: u64) -> Result<(), TransportError> {
    let mut scratch = [0u8; 16 << 10];
    while len > 0 {
        let n = scratch
            .len()
            .min(usize::try_from(len).unwrap_or(usize::MAX));
        read_exact(r, &mut scratch[..n]).await?;
        len -= n as u64;
    }
    Ok(())
}

/// Writes a header and body; the caller writes `payload_len` payload bytes right after.
pub async fn write_head<W: AsyncWrite + Unpin>(
    w: &mut W,
    header: &FrameHeader,
    body: &[u8],
) -> Result<(), TransportError> {
    let mut buf = Vec::with_capacity(HEADER_LEN + body.len());
    buf.extend_from_slice(&header.encode());
    buf.extend_from_slice(body);
    w.write_all(&buf).await?;
    Ok(())
}

/// Encodes a request frame's header and body into one buffer.
/// Sends `msg` (request id 0) on a stream nothing else uses yet and reads its answer straight
/// off it (no read-ahead), before the stream is handed on: a connection's first exchanges
/// (`Hello`, `Local`).
pub async fn exchange<M: Message, S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    msg: &M,
    limits: &FrameLimits,
) -> Result<M::Response, TransportError> {
    stream.write_all(&encode_request(0, msg, 0)).await?;
    let header = read_header(stream, limits)
        .await?
        .ok_or(TransportError::Closed)?;
    if !header.is_response() || header.payload_len != 0 {
        return Err(TransportError::Protocol(format!(
            "unexpected frame in answer to {:?}",
            M::OPCODE
        )));
    }
    let body = read_body(stream, header.body_len).await?;
    decode_response(&header, &body)
}

pub fn encode_request<M: Message>(request_id: u64, msg: &M, payload_len: u64) -> Vec<u8> {
    encode_request_flagged(request_id, msg, payload_len, 0)
}

/// [`encode_request`] with header `flags` (such as `FLAG_STREAMED` on a `Read`).
pub fn encode_request_flagged<M: Message>(
    request_id: u64,
    msg: &M,
    payload_len: u64,
    flags: u8,
) -> Vec<u8> {
    let body = encode_body(msg);
    let header = FrameHeader::request(M::OPCODE as u8, request_id, body_len(&body), payload_len)
        .with_flags(flags);
    let mut buf = Vec::with_capacity(HEADER_LEN + body.len());
    buf.extend_from_slice(&header.encode());
    buf.extend_from_slice(&body);
    buf
}

/// Encodes a successful response frame's header and body into one buffer.
pub fn encode_response<T: Serialize>(
    opcode: u8,
    request_id: u64,
    msg: &T,
    payload_len: u64,
) -> Vec<u8> {
    encode_response_flagged(opcode, request_id, msg, payload_len, 0)
}

/// [`encode_response`] with header `flags` in addition to the response bit.
pub fn encode_response_flagged<T: Serialize>(
    opcode: u8,
    request_id: u64,
    msg: &T,
    payload_len: u64,
    flags: u8,
) -> Vec<u8> {
    let body = encode_body(msg);
    let header = FrameHeader::response(
        opcode,
        request_id,
        ErrorCode::Ok,
        body_len(&body),
        payload_len,
    )
    .with_flags(flags);
    let mut buf = Vec::with_capacity(HEADER_LEN + body.len());
    buf.extend_from_slice(&header.encode());
    buf.extend_from_slice(&body);
    buf
}

/// Encodes an error response: the code in the header, the message as the body (UTF-8).
pub fn encode_error(opcode: u8, request_id: u64, err: &WireError) -> Vec<u8> {
    let body = err.message.as_bytes();
    let header = FrameHeader::response(opcode, request_id, err.code, body_len(body), 0);
    let mut buf = Vec::with_capacity(HEADER_LEN + body.len());
    buf.extend_from_slice(&header.encode());
    buf.extend_from_slice(body);
    buf
}

/// Turns a response header and body into the typed response or the error it carries.
pub fn decode_response<T: serde::de::DeserializeOwned>(
    header: &FrameHeader,
    body: &[u8],
) -> Result<T, TransportError> {
    match header.code() {
        ErrorCode::Ok => decode_body(body).map_err(TransportError::Remote),
        code => Err(TransportError::Remote(WireError::new(
            code,
            String::from_utf8_lossy(body).into_owned(),
        ))),
    }
}

fn body_len(body: &[u8]) -> u32 {
    // Bodies are built from messages whose size the sender controls; one beyond u32 is a bug
    // that the receiver's limit check reports as FrameTooLarge.
    u32::try_from(body.len()).unwrap_or(u32::MAX)
}

impl From<HeaderError> for TransportError {
    fn from(e: HeaderError) -> Self {
        TransportError::Header(e)
    }
}

/// Most bytes gathered into one socket write by [`write_coalesced`].
const COALESCE_LIMIT: usize = 1 << 20;

/// Writes every frame sent on `rx` to `w`, gathering frames queued meanwhile into one write so
/// that many small pipelined requests or answers cost few syscalls. Ends when the channel
/// closes (then shuts the write side down) or the socket fails.
pub async fn write_coalesced<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
) {
    let mut buf = Vec::new();
    while let Some(first) = rx.recv().await {
        buf.clear();
        buf.extend_from_slice(&first);
        while buf.len() < COALESCE_LIMIT {
            match rx.try_recv() {
                Ok(more) => buf.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if w.write_all(&buf).await.is_err() {
            return;
        }
    }
    let _ = w.shutdown().await;
}
