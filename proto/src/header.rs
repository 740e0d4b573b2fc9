//! The fixed 32-byte frame header that starts every request and response.
//!
//! ```text
//!  0      2     3      4     5     6      8            16        20           28      32
//!  | magic | ver | opc | flg | rsv | code | request_id | body_len | payload_len | crc32c |
//! ```
//! All integers are little-endian. `crc32c` covers bytes 0..28: a stream that fell out of step
//! (a peer that wrote half a frame, random bytes) is detected at the first header instead of
//! being parsed as a huge length. The body (`body_len` bytes, a postcard-encoded message) and
//! the raw payload (`payload_len` bytes, object data, never serialized) follow.

use crate::ErrorCode;

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 32;
/// "KP": the first two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"KP";
/// The protocol version this build speaks.
pub const VERSION: u8 = 2;

/// Flag bit: the frame is a response.
pub const FLAG_RESPONSE: u8 = 0b0000_0001;
/// Flag bit of a `Read`: on the request, the reader takes a streamed answer; on the response,
/// the answer is streamed (each admitted op's bytes followed by its status,
/// [`crate::msg::ReadStatus`]). A node that does not know the bit ignores it (flags were never
/// checked) and answers in the plain layout, without the bit, so the reader parses what the
/// response says it is.
pub const FLAG_STREAMED: u8 = 0b0000_0010;
/// Flag bit of a `GetReplicas` response: the master moves no object because it is read
/// (`master.promote-after-hits = 0`), so a client may keep the NVMe locations of this answer
/// in its location cache (reads it serves from them are not missed by the master). An older
/// master never sets it and an older client ignores it (flags were never checked).
pub const FLAG_NO_PROMOTION: u8 = 0b0000_0100;

/// Size limits a receiver enforces before it allocates anything for a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest body (serialized message) accepted.
    pub max_body: u32,
    /// Largest raw payload accepted.
    pub max_payload: u64,
}

impl Default for FrameLimits {
    fn default() -> Self {
        FrameLimits {
            max_body: 64 << 20,
            max_payload: 4 << 30,
        }
    }
}

/// A decoded frame header. The opcode is kept raw: an unknown opcode is a request-level error
/// (answered, then the frame is skipped), not a stream-level one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub opcode: u8,
    pub flags: u8,
    pub code: u16,
    pub request_id: u64,
    pub body_len: u32,
    pub payload_len: u64,
}

/// Why a header was refused. All of these end the connection (after an error response where
/// the peer can still read one), because the receiver can no longer trust the stream's framing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("bad magic {0:02x?}: not a kvpool peer")]
    BadMagic([u8; 2]),
    #[error("header checksum mismatch: stream corrupt or out of step")]
    BadChecksum,
    #[error("protocol version {0} not supported (this build speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("body of {len} bytes exceeds the limit of {max}")]
    BodyTooLarge { len: u32, max: u32 },
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLarge { len: u64, max: u64 },
}

impl HeaderError {
    pub fn code(&self) -> ErrorCode {
        match self {
            HeaderError::BadMagic(_) => ErrorCode::BadMagic,
            HeaderError::BadChecksum => ErrorCode::BadHeaderChecksum,
            HeaderError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            HeaderError::BodyTooLarge { .. } | HeaderError::PayloadTooLarge { .. } => {
                ErrorCode::FrameTooLarge
            }
        }
    }
}

impl FrameHeader {
    pub fn request(opcode: u8, request_id: u64, body_len: u32, payload_len: u64) -> Self {
        FrameHeader {
            opcode,
            flags: 0,
            code: 0,
            request_id,
            body_len,
            payload_len,
        }
    }

    pub fn response(
        opcode: u8,
        request_id: u64,
        code: ErrorCode,
        body_len: u32,
        payload_len: u64,
    ) -> Self {
        FrameHeader {
            opcode,
            flags: FLAG_RESPONSE,
            code: code as u16,
            request_id,
            body_len,
            payload_len,
        }
    }

    pub fn is_response(&self) -> bool {
        self.flags & FLAG_RESPONSE != 0
    }

    /// Whether [`FLAG_STREAMED`] is set.
    pub fn is_streamed(&self) -> bool {
        self.flags & FLAG_STREAMED != 0
    }

    /// The header with `flags` set in addition to its own.
    pub fn with_flags(mut self, flags: u8) -> Self {
        self.flags |= flags;
        self
    }

    pub fn code(&self) -> ErrorCode {
        ErrorCode::from_u16(self.code)
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&MAGIC);
        b[2] = VERSION;
        b[3] = self.opcode;
        b[4] = self.flags;
        b[6..8].copy_from_slice(&self.code.to_le_bytes());
        b[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        b[16..20].copy_from_slice(&self.body_len.to_le_bytes());
        b[20..28].copy_from_slice(&self.payload_len.to_le_bytes());
        let crc = crate::crc32c::crc32c(&b[0..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates a header. Checks run in an order that gives the most useful
    /// message: magic (is this kvpool at all?), version (a version bump may move the checksum),
    /// checksum, then limits.
    pub fn decode(b: &[u8; HEADER_LEN], limits: &FrameLimits) -> Result<Self, HeaderError> {
        let magic = [b[0], b[1]];
        if magic != MAGIC {
            return Err(HeaderError::BadMagic(magic));
        }
        if b[2] != VERSION {
            return Err(HeaderError::UnsupportedVersion(b[2]));
        }
        let want = u32::from_le_bytes([b[28], b[29], b[30], b[31]]);
        if crate::crc32c::crc32c(&b[0..28]) != want {
            return Err(HeaderError::BadChecksum);
        }
        let h = FrameHeader {
            opcode: b[3],
            flags: b[4],
            code: u16::from_le_bytes([b[6], b[7]]),
            request_id: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
            body_len: u32::from_le_bytes([b[16], b[17], b[18], b[19]]),
            payload_len: u64::from_le_bytes([
                b[20], b[21], b[22], b[23], b[24], b[25], b[26], b[27],
            ]),
        };
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
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn golden_bytes() {
        let h = FrameHeader::request(0x10, 7, 3, 5);
        let b = h.encode();
        assert_eq!(&b[0..8], &[b'K', b'P', 2, 0x10, 0, 0, 0, 0]);
        assert_eq!(&b[8..16], &7u64.to_le_bytes());
        assert_eq!(&b[16..20], &3u32.to_le_bytes());
        assert_eq!(&b[20..28], &5u64.to_le_bytes());
        assert_eq!(FrameHeader::decode(&b, &FrameLimits::default()), Ok(h));
    }

    #[test]
    fn refuses_wrong_version_and_limits() {
        let limits = FrameLimits {
            max_body: 10,
            max_payload: 10,
        };
        let mut b = FrameHeader::request(1, 1, 0, 0).encode();
        b[2] = 9;
        assert_eq!(
            FrameHeader::decode(&b, &limits),
            Err(HeaderError::UnsupportedVersion(9))
        );
        let b = FrameHeader::request(1, 1, 11, 0).encode();
        assert!(matches!(
            FrameHeader::decode(&b, &limits),
            Err(HeaderError::BodyTooLarge { .. })
        ));
        let b = FrameHeader::request(1, 1, 0, 11).encode();
        assert!(matches!(
            FrameHeader::decode(&b, &limits),
            Err(HeaderError::PayloadTooLarge { .. })
        ));
        let mut b = FrameHeader::request(1, 1, 0, 0).encode();
        b[9] ^= 1;
        assert_eq!(
            FrameHeader::decode(&b, &limits),
            Err(HeaderError::BadChecksum)
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::array::uniform32(any::<u8>())) {
            let _ = FrameHeader::decode(&bytes, &FrameLimits::default());
        }

        #[test]
        fn round_trip(op: u8, flags: u8, code: u16, id: u64, body in 0u32..1000, payload in 0u64..1000) {
            let h = FrameHeader { opcode: op, flags, code, request_id: id, body_len: body, payload_len: payload };
            prop_assert_eq!(FrameHeader::decode(&h.encode(), &FrameLimits::default()), Ok(h));
        }
    }
}
