//! The master's thin async shell: decode a request, hand it to [`MasterCore`] under a lock
//! with the current time, encode the answer. Nothing in here decides anything.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use kvpool_proto::{decode_body, encode_body, FrameLimits, Message, Opcode, WireError};
use kvpool_transport::server::{serve_rpc_with, RpcService, ServerOptions};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::{config::MasterConfig, core::MasterCore};

struct Service {
    core: Mutex<MasterCore>,
    epoch: Instant,
}

impl Service {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn core(&self) -> std::sync::MutexGuard<'_, MasterCore> {
        // The core is only mutated through whole requests; a panic inside one is a bug we
        // would rather keep serving through than turn into a crash loop of every caller.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn call<M: Message, R: Serialize>(
    body: &[u8],
    f: impl FnOnce(M) -> R,
) -> Result<Vec<u8>, WireError> {
    let req: M = decode_body(body)?;
    Ok(encode_body(&f(req)))
}

impl RpcService for Service {
    fn handle(&self, opcode: Opcode, body: &[u8]) -> Result<Vec<u8>, WireError> {
        let now = self.now();
        match opcode {
            Opcode::PutStart => call(body, |r| self.core().put_start(now, r)),
            Opcode::PutEnd => call(body, |r| self.core().put_end(now, r)),
            Opcode::PutRevoke => call(body, |r| self.core().put_revoke(now, r)),
            Opcode::GetReplicas => call(body, |r| self.core().get_replicas(now, r)),
            Opcode::Exists => call(body, |r| self.core().exists(now, r)),
            Opcode::Remove => call(body, |r| self.core().remove(now, r)),
            Opcode::RemoveAll => call(body, |r| self.core().remove_all(now, r)),
            Opcode::Status => call(body, |_: kvpool_proto::Status| self.core().status(now)),
            Opcode::Register => call(body, |r| self.core().register(now, r)),
            Opcode::Heartbeat => call(body, |r| self.core().heartbeat(now, r)),
            // The transport answers (and checks) Hello itself; this is only reached if a
            // server is wired without it, and then an answer is still the right one.
            Opcode::Hello => call(body, |_: kvpool_proto::Hello| kvpool_proto::HelloResponse {
                server_version: u16::from(kvpool_proto::header::VERSION),
            }),
            Opcode::Read | Opcode::Write => Err(WireError::new(
                kvpool_proto::ErrorCode::WrongService,
                "data-plane request sent to the master; send it to a storage node",
            )),
        }
    }
}

/// Serves the master on `listener` until `shutdown` completes. With a token in `cfg` (or a
/// `token_file` to read it from), every connection must present it first. A token file that
/// cannot be read is fatal: the master logs why and does not serve, rather than serve open.
pub async fn run(listener: TcpListener, cfg: &MasterConfig, shutdown: impl Future<Output = ()>) {
    let mut cfg = cfg.clone();
    if let Err(e) = cfg.load_token() {
        tracing::error!("not serving: {e}");
        return;
    }
    let cfg = &cfg;
    // Replica ids must not repeat across master restarts (a node may still hold ids from
    // the previous master), so they start at the wall clock in nanoseconds.
    let id_base = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let service = Arc::new(Service {
        core: Mutex::new(MasterCore::new(cfg.core(), id_base)),
        epoch: Instant::now(),
    });
    let ticker = {
        let service = service.clone();
        let every = cfg.tick.0;
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let now = service.now();
                service.core().tick(now);
            }
        })
    };
    if cfg.token.is_some() {
        tracing::info!("a cluster token is required on every connection");
    }
    let opts = ServerOptions {
        limits: FrameLimits::default(),
        token: cfg.token.clone(),
    };
    serve_rpc_with(listener, service, opts, shutdown).await;
    ticker.abort();
}
