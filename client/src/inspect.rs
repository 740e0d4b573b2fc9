//! `Client::inspect`: what the master knows of one object, for operators and tools.

use kvpool_proto::{ErrorCode, Inspect, ObjectDetail};

use crate::{internal, Client, ClientError, Result};

impl Client {
    /// The master's record of `key` (in this client's tenant): replicas with their tier and
    /// state, size, checksum, the lease and pins it holds, reads since commit. `Ok(None)` when
    /// the key is not in the pool. Read-only: grants no lease, changes no recency.
    pub async fn inspect(&self, key: &[u8]) -> Result<Option<ObjectDetail>> {
        self.check_tenant()?;
        let msg = Inspect {
            keys: vec![self.wire_key(key)],
        };
        match self.master_call(&msg).await?.items.pop() {
            Some(Ok(d)) => Ok(Some(d)),
            Some(Err(e)) if e.code == ErrorCode::NotFound => Ok(None),
            Some(Err(e)) => Err(ClientError::from(e)),
            None => Err(internal("empty inspect result")),
        }
    }
}
