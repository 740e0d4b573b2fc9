//! Writes: a record is copied through staging buffers (checksummed on the way) and written
//! at the extent the master allocated, in pieces, then handed to the commit pipeline.

use futures::{stream::FuturesUnordered, StreamExt};

use super::{
    layout::{encode_header, RecordHeader},
    records::now_ms,
    tier::Shared,
    value_offset, NvmeError, NvmeRecordInfo, NvmeTier, MAX_KEY_LEN,
};

/// Pieces of one large record written concurrently.
const PIECES_IN_FLIGHT: usize = 8;

impl NvmeTier {
    /// Writes a record at `offset` (an extent of at least [`record_len`](super::record_len)
    /// bytes the master allocated), makes it durable, then indexes it. `checksum` is the
    /// value's crc32c; a value that does not match it is refused rather than stored.
    pub async fn write_record(
        &self,
        offset: u64,
        replica: u64,
        key: &[u8],
        value: &[u8],
        checksum: u32,
    ) -> Result<(), NvmeError> {
        let s = &self.shared;
        s.check_healthy()?;
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(NvmeError::InvalidArgument(format!(
                "key of {} bytes (1 to {MAX_KEY_LEN})",
                key.len()
            )));
        }
        let total = s.check_extent(offset, key.len(), value.len() as u64)?;
        let _pending = Pending::register(s, replica)?;

        let hb = value_offset(key.len()) as usize;
        let mut header = vec![0u8; hb];
        encode_header(
            &RecordHeader {
                replica,
                key_len: key.len() as u32,
                value_len: value.len() as u64,
                value_crc: checksum,
            },
            key,
            &mut header,
        );
        let piece = s.pool.buf_size();
        let mismatch = |actual| NvmeError::ChecksumMismatch {
            offset,
            expected: checksum,
            actual,
        };
        // A value that does not match its checksum must not touch the extent (it could still
        // hold bytes someone reads). A one-piece record is checked as it is copied, in cache,
        // before its single write; a larger one is checked up front, in a pass of its own.
        let one_piece = total <= piece;
        if !one_piece {
            let actual = kvpool_proto::crc32c::crc32c(value);
            if actual != checksum {
                return Err(mismatch(actual));
            }
        }
        let mut inflight = FuturesUnordered::new();
        let mut first_err = None;
        let mut pos = 0usize;
        while pos < total || !inflight.is_empty() {
            if pos < total && inflight.len() < PIECES_IN_FLIGHT && first_err.is_none() {
                let n = (total - pos).min(piece);
                let mut buf = s.pool.take_or_alloc(n);
                let crc = fill_record(&mut buf, pos, &header, value, 0);
                if one_piece && crc != checksum {
                    return Err(mismatch(crc));
                }
                let at = offset + pos as u64;
                inflight.push(async move { (at, n, s.engine.write(buf, at).await) });
                pos += n;
                continue;
            }
            let Some((at, n, (_buf, r))) = inflight.next().await else {
                break;
            };
            if let Err(e) = r {
                first_err.get_or_insert_with(|| s.io_failed("write", at, n as u64, e));
            }
            if first_err.is_some() && inflight.is_empty() {
                break;
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }

        let info = NvmeRecordInfo {
            replica,
            key: key.to_vec(),
            offset,
            value_len: value.len() as u64,
            checksum,
            last_access_ms: now_ms(),
        };
        self.commit(info).await
    }
}

/// Marks a replica as being written for as long as its `write_record` runs.
struct Pending<'a> {
    shared: &'a Shared,
    replica: u64,
}

impl<'a> Pending<'a> {
    fn register(shared: &'a Shared, replica: u64) -> Result<Self, NvmeError> {
        let mut st = shared.lock();
        if st.pending.contains_key(&replica) {
            return Err(NvmeError::InvalidArgument(format!(
                "replica {replica} is already being written"
            )));
        }
        st.pending.insert(replica, false);
        Ok(Pending { shared, replica })
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.replica);
    }
}

/// Copies the part `pos..pos+dst.len()` of the record (header block, value, zero padding)
/// into `dst`, extending `crc` (the value's crc32c so far) over the value bytes copied.
fn fill_record(dst: &mut [u8], pos: usize, header: &[u8], value: &[u8], mut crc: u32) -> u32 {
    // Checksummed right after the copy, while the bytes are still in cache.
    const STRIDE: usize = 64 << 10;
    let end = pos + dst.len();
    let hb = header.len();
    let mut covered = pos;
    let (a, b) = (pos, hb.min(end));
    if a < b {
        dst[..b - a].copy_from_slice(&header[a..b]);
        covered = b;
    }
    let (a, b) = (hb.max(pos), (hb + value.len()).min(end));
    if a < b {
        for (d, v) in dst[a - pos..b - pos]
            .chunks_mut(STRIDE)
            .zip(value[a - hb..b - hb].chunks(STRIDE))
        {
            d.copy_from_slice(v);
            crc = kvpool_proto::crc32c::crc32c_append(crc, d);
        }
        covered = b;
    }
    // What follows the value is padding; pool buffers hold earlier data, so zero it.
    let pad_from = covered.max(hb + value.len()).max(pos);
    if pad_from < end {
        dst[pad_from - pos..].fill(0);
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_record_lays_out_header_value_and_padding() {
        let header = {
            let mut h = vec![0u8; 4096];
            h[..3].copy_from_slice(b"HDR");
            h
        };
        let value: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8 + 1).collect();
        let total = 4096 + 8192;
        let mut whole = vec![0xAAu8; total];
        let crc = fill_record(&mut whole, 0, &header, &value, 0);
        assert_eq!(crc, kvpool_proto::crc32c::crc32c(&value));
        assert_eq!(&whole[..4096], &header[..]);
        assert_eq!(&whole[4096..4096 + 5000], &value[..]);
        assert!(whole[4096 + 5000..].iter().all(|&b| b == 0));
        // Any split gives the same bytes.
        for piece in [1usize, 100, 4096, 5000, 7000] {
            let mut out = Vec::new();
            let mut pos = 0;
            let mut crc = 0;
            while pos < total {
                let n = piece.min(total - pos);
                let mut d = vec![0xAAu8; n];
                crc = fill_record(&mut d, pos, &header, &value, crc);
                out.extend_from_slice(&d);
                pos += n;
            }
            assert_eq!(out, whole, "piece {piece}");
            assert_eq!(crc, kvpool_proto::crc32c::crc32c(&value), "piece {piece}");
        }
    }
}
