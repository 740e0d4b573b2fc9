//! Pooled connections: checkout, checkin, and running one request with a retry on a fresh
//! connection when a pooled one turned out dead.

use std::sync::atomic::Ordering;

use tokio::net::TcpStream;

use super::{chunk::Chunk, exchange::Exchange, RequestOutcome, TransferEngine};
use crate::TransportError;

impl TransferEngine {
    /// Runs one request, asking with `msg` for `chunks`, on a pooled connection or a new one.
    pub(super) async fn request<P, M: Exchange<P>>(
        &self,
        addr: &str,
        msg: M,
        mut chunks: Vec<Chunk<P>>,
    ) -> RequestOutcome<P, M::Value> {
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            let (conn, pooled) = match self.checkout(addr).await {
                Ok(c) => c,
                Err(e) => break Err(e),
            };
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let exchange = msg.exchange(conn, id, &mut chunks, &self.opts);
            let r = tokio::time::timeout(self.opts.io_timeout, exchange).await;
            if let Some(done) = self.settle(addr, r, pooled && attempt == 1, M::OP) {
                break done;
            }
        };
        (chunks, result)
    }

    /// What one attempt at an exchange came to: its answer (the connection goes back to the
    /// pool), or `None` when a connection taken from the pool turned out dead (`may_retry`)
    /// and the exchange should run again on a fresh one. Reads and writes of a range are
    /// idempotent, so running one twice is safe.
    fn settle<T>(
        &self,
        addr: &str,
        r: Result<Result<(TcpStream, T), TransportError>, tokio::time::error::Elapsed>,
        may_retry: bool,
        op: &'static str,
    ) -> Option<Result<T, TransportError>> {
        match r {
            Ok(Ok((conn, resp))) => {
                self.checkin(addr, conn);
                Some(Ok(resp))
            }
            Ok(Err(e)) if may_retry && e.is_retryable() => None,
            Ok(Err(e)) => Some(Err(e)),
            Err(_) => Some(Err(TransportError::Timeout {
                op,
                after: self.opts.io_timeout,
            })),
        }
    }

    async fn checkout(&self, addr: &str) -> Result<(TcpStream, bool), TransportError> {
        let pooled = self
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(addr)
            .and_then(Vec::pop);
        if let Some(c) = pooled {
            return Ok((c, true));
        }
        let mut stream =
            match tokio::time::timeout(self.opts.connect_timeout, TcpStream::connect(addr)).await {
                Ok(s) => s?,
                Err(_) => {
                    return Err(TransportError::Timeout {
                        op: "connect",
                        after: self.opts.connect_timeout,
                    })
                }
            };
        stream.set_nodelay(true)?;
        if let Some(token) = &self.opts.token {
            crate::auth::client_hello(
                &mut stream,
                token,
                &self.opts.limits,
                self.opts.connect_timeout,
            )
            .await?;
        }
        Ok((stream, false))
    }

    fn checkin(&self, addr: &str, conn: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(addr.to_string()).or_default();
        if list.len() < self.opts.conns_per_peer * 2 {
            list.push(conn);
        }
    }

    /// Drops idle connections to `addr` and what is known of its shared memory (after the
    /// peer failed).
    pub fn forget(&self, addr: &str) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(addr);
        self.shm.forget(addr);
    }
}
