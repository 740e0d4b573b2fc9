//! The servers' HTTP endpoint (`/metrics`, `/health`, `/ready`): bound before the `ready`
//! line, so that a caller asking for port 0 learns the real address from it.

use std::net::SocketAddr;

use anyhow::Context;
use kvpool_ops::Endpoint;
use tokio::net::TcpListener;

/// Binds `addr` and serves an endpoint on it for the life of the process; parts are added to
/// the returned endpoint as they start. An empty `addr` turns HTTP off. The default address
/// already taken (a second server on one box) is a warning, so that `kvpool master` twice on
/// a laptop works; any address the operator chose must bind, or the server does not start.
pub async fn start(addr: &str, default: &str) -> anyhow::Result<(Endpoint, Option<SocketAddr>)> {
    let ep = Endpoint::new();
    if addr.is_empty() {
        return Ok((ep, None));
    }
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) if addr == default && e.kind() == std::io::ErrorKind::AddrInUse => {
            tracing::warn!(
                %addr,
                "HTTP (metrics, health, ready) not served: the default address is in use; \
                 set --http to another address"
            );
            return Ok((ep, None));
        }
        Err(e) => {
            return Err(e).with_context(|| format!("binding the HTTP endpoint to {addr}"));
        }
    };
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "serving /metrics, /health and /ready");
    let serving = ep.clone();
    tokio::spawn(async move {
        if let Err(e) = serving.serve(listener, std::future::pending()).await {
            tracing::error!("HTTP endpoint stopped: {e}");
        }
    });
    Ok((ep, Some(bound)))
}

/// ` http=ADDR` for the `ready` line, or nothing.
pub fn ready_field(addr: Option<SocketAddr>) -> String {
    addr.map(|a| format!(" http={a}")).unwrap_or_default()
}
