//! The device-bound part: open a device, register memory, set up the queue pairs of a
//! connection from the handshake, and run batches on them.
//!
//! One [`RdmaDevice`] per process and device: its protection domain holds every registered
//! region (a node's segments, a client's buffers), each registered once. A connection is a
//! set of lanes (RC queue pairs) sharing one completion queue, created per TCP data
//! connection by its handshake:
//!
//! - node: on `RdmaConnect`, [`RdmaDevice::accept`] creates as many queue pairs as the client
//!   asked for (at most its own `lanes`), brings them to ready-to-send against the client's,
//!   and returns the answer (its port, its QPs, its segments) and an [`RdmaPeer`] to keep
//!   alive with the connection. The node never posts: the client's READs and WRITEs are
//!   one-sided.
//! - client: [`RdmaDevice::connect`] creates the queue pairs and the request to send;
//!   [`Connecting::finish`] takes the node's answer and yields the [`RdmaPeer`] whose
//!   [`RdmaPeer::run`] moves batches.

use std::{
    sync::{
        atomic::{AtomicU16, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use kvpool_proto::rdma::{
    LinkLayer, QpEndpoint, RdmaConnect, RdmaEndpoint, RdmaPort, RegionDesc, MAX_QPS_PER_PEER,
    RDMA_VERSION,
};

use super::{
    completion::{Tracker, WcError},
    handshake::{initial_psn, pair, RemoteRegions},
    plan::{plan, Limits, Plan, Transfer},
    registry::{Access, Region, Registry},
    verbs::{self, Context, Cq, Mr, Pd, Qp, QpConfig},
    RdmaError,
};

/// Which device and port, and how queue pairs are sized.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// The device's name (as `ibv_devices` prints it); the first device when unset.
    pub device: Option<String>,
    /// The port, counted from 1 [1].
    pub port: u8,
    /// The GID table index used for global routing (RoCE needs one; on RoCE v2 it is the
    /// entry of the interface's IP address, often 1 or 3) [0].
    pub gid_index: u8,
    /// Queue pairs per peer [4].
    pub lanes: usize,
    /// Send-queue depth, entries per request and stripe size; clamped to the device's.
    pub limits: Limits,
    /// Local ACK timeout exponent: 4.096 µs × 2^n before a retry [14: 67 ms].
    pub ack_timeout: u8,
    /// Transport retries before a request fails [7].
    pub retry_cnt: u8,
}

impl DeviceOptions {
    /// The defaults, with the device and GID index from `KVPOOL_RDMA_DEVICE` and
    /// `KVPOOL_RDMA_GID_INDEX` when set: how a node and a client pick theirs.
    pub fn from_env() -> DeviceOptions {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.trim().is_empty());
        DeviceOptions {
            device: var("KVPOOL_RDMA_DEVICE"),
            gid_index: var("KVPOOL_RDMA_GID_INDEX")
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0),
            ..DeviceOptions::default()
        }
    }
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            device: None,
            port: 1,
            gid_index: 0,
            lanes: 4,
            limits: Limits::default(),
            ack_timeout: 14,
            retry_cnt: 7,
        }
    }
}

/// An open RDMA device with its protection domain and registered memory.
pub struct RdmaDevice {
    ctx: Arc<Context>,
    pd: Arc<Pd>,
    port: RdmaPort,
    qp: QpConfig,
    limits: Limits,
    lanes: usize,
    /// The device's largest completion queue.
    max_cqe: i32,
    regions: Mutex<Registry<Mr>>,
    epoch: AtomicU16,
}

impl std::fmt::Debug for RdmaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaDevice")
            .field("device", &self.ctx.name)
            .field("port", &self.port)
            .field("limits", &self.limits)
            .finish()
    }
}

impl RdmaDevice {
    /// Opens the device and checks its port is active. Without a device, kernel support or
    /// an active port: [`RdmaError::Unavailable`], which callers answer by using TCP.
    pub fn open(opts: &DeviceOptions) -> Result<Arc<RdmaDevice>, RdmaError> {
        opts.limits.validate()?;
        if opts.lanes == 0 || opts.lanes > MAX_QPS_PER_PEER {
            return Err(RdmaError::InvalidArgument(format!(
                "{} lanes per peer (allowed 1..={MAX_QPS_PER_PEER})",
                opts.lanes
            )));
        }
        let ctx = Arc::new(Context::open(opts.device.as_deref())?);
        let dev = ctx.query_device()?;
        let port = ctx.query_port(opts.port)?;
        if port.state != ibverbs_sys::ibv_port_state::IBV_PORT_ACTIVE {
            return Err(RdmaError::Unavailable(format!(
                "{} port {} is not active (state {})",
                ctx.name, opts.port, port.state
            )));
        }
        let link_layer = if u32::from(port.link_layer) == ibverbs_sys::IBV_LINK_LAYER_ETHERNET {
            LinkLayer::Ethernet
        } else {
            LinkLayer::Infiniband
        };
        let gid = match ctx.query_gid(opts.port, opts.gid_index) {
            Ok(g) => g,
            Err(_) if link_layer == LinkLayer::Infiniband => [0; 16],
            Err(e) => return Err(e),
        };
        let positive = |v: i32| u32::try_from(v).unwrap_or(0).max(1);
        let max_sge = if dev.max_sge_rd > 0 {
            positive(dev.max_sge).min(positive(dev.max_sge_rd))
        } else {
            positive(dev.max_sge)
        };
        let limits = Limits {
            max_send_wr: opts.limits.max_send_wr.min(positive(dev.max_qp_wr)),
            max_sge: opts.limits.max_sge.min(max_sge),
            max_msg_size: opts
                .limits
                .max_msg_size
                .min(u64::from(port.max_msg_sz.max(1))),
            stripe: opts.limits.stripe,
        };
        let qp = QpConfig {
            port: opts.port,
            gid_index: opts.gid_index,
            max_send_wr: limits.max_send_wr,
            max_sge: limits.max_sge,
            // The device bounds the initiator and responder depths separately; a QP asking
            // for more than either fails its move to RTR or RTS.
            max_rd_atomic: positive(dev.max_qp_init_rd_atom).min(16) as u8,
            max_dest_rd_atomic: positive(dev.max_qp_rd_atom).min(16) as u8,
            ack_timeout: opts.ack_timeout,
            retry_cnt: opts.retry_cnt.min(7),
            remote_access: false,
        };
        let port = RdmaPort {
            link_layer,
            lid: port.lid,
            gid,
            mtu: verbs::mtu_bytes(port.active_mtu),
        };
        let pd = Arc::new(Pd::new(ctx.clone())?);
        Ok(Arc::new(RdmaDevice {
            ctx,
            pd,
            port,
            qp,
            limits,
            lanes: opts.lanes,
            max_cqe: dev.max_cqe.max(1),
            regions: Mutex::new(Registry::default()),
            epoch: AtomicU16::new(0),
        }))
    }

    pub fn name(&self) -> &str {
        &self.ctx.name
    }

    pub fn port(&self) -> RdmaPort {
        self.port
    }

    /// The limits in force: the options' clamped to the device's.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn registry(&self) -> MutexGuard<'_, Registry<Mr>> {
        // A panic while holding the lock leaves the map consistent (every change is one
        // insert or remove), so a poisoned lock is still usable.
        self.regions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `[addr, addr + len)` under `id` (a segment id on a node, with
    /// [`Access::Remote`]; a buffer id on a client, with [`Access::Local`]), once: an overlap
    /// with a registered region is refused before the device is asked.
    ///
    /// # Safety
    /// The memory must stay mapped until [`RdmaDevice::unregister`] succeeds for it. With
    /// [`Access::Remote`], peers may read and write it at any time in between.
    pub unsafe fn register(
        &self,
        id: u64,
        addr: u64,
        len: u64,
        access: Access,
    ) -> Result<Region, RdmaError> {
        // The lock is held across the device's registration (milliseconds, once per region)
        // so that two overlapping registrations cannot both pass the check.
        let mut reg = self.registry();
        reg.check_new(id, addr, len)?;
        // SAFETY: the caller keeps the memory mapped while it is registered.
        let mr = unsafe { Mr::register(&self.pd, addr, len, access == Access::Remote) }?;
        let (lkey, rkey) = mr.keys();
        let region = Region {
            id,
            addr,
            len,
            lkey,
            rkey,
            access,
        };
        reg.insert(region, mr).copied()
    }

    /// Deregisters the region starting at `addr`; refused while a batch uses it.
    pub fn unregister(&self, addr: u64) -> Result<Region, RdmaError> {
        let (region, mr) = self.registry().remove(addr)?;
        drop(mr);
        Ok(region)
    }

    /// Whether `[addr, addr + len)` lies inside one region registered with this device (a
    /// transfer's piece there needs no bounce buffer).
    pub fn covers(&self, addr: u64, len: u64) -> bool {
        self.registry().lookup(addr, len).is_ok()
    }

    /// Every registered region, as a handshake describes them.
    pub fn regions(&self) -> Vec<RegionDesc> {
        self.registry().descs()
    }

    fn new_lanes(&self, n: usize, remote_access: bool) -> Result<NewLanes, RdmaError> {
        // Room for every request a lane can hold (a failed lane may report each as flushed),
        // within what the device allows.
        let entries = (n * self.limits.max_send_wr as usize).clamp(16, 1 << 16) as i32;
        let cq = Arc::new(Cq::new(self.ctx.clone(), entries.min(self.max_cqe))?);
        let mut qps = Vec::with_capacity(n);
        let mut eps = Vec::with_capacity(n);
        for _ in 0..n {
            let cfg = QpConfig {
                remote_access,
                ..self.qp
            };
            let qp = Qp::new(&self.pd, &cq, cfg)?;
            eps.push(QpEndpoint {
                qp_num: qp.qp_num(),
                psn: initial_psn(),
            });
            qps.push(qp);
        }
        Ok((cq, qps, eps))
    }

    fn endpoint(&self, qps: Vec<QpEndpoint>, regions: Vec<RegionDesc>) -> RdmaEndpoint {
        RdmaEndpoint {
            version: RDMA_VERSION,
            port: self.port,
            qps,
            regions,
        }
    }

    /// Node side: answers a client's `RdmaConnect` with at most this device's `lanes` queue
    /// pairs (a client asking for more gets fewer, so one client cannot make a node create
    /// many), which allow remote access, and the node's remote-access regions (its segments).
    /// The returned peer owns the node's queue pairs and must live as long as the TCP
    /// connection the request came on.
    pub fn accept(
        self: &Arc<Self>,
        request: &RdmaConnect,
    ) -> Result<(RdmaEndpoint, RdmaPeer), RdmaError> {
        let theirs = &request.endpoint;
        theirs.validate()?;
        let (cq, qps, eps) = self.new_lanes(theirs.qps.len().min(self.lanes), true)?;
        let ours = self.endpoint(eps, self.regions());
        let lanes = pair(&ours, theirs)?;
        for (qp, lane) in qps.iter().zip(&lanes) {
            qp.connect(lane)?;
        }
        let peer = RdmaPeer::new(self.clone(), cq, qps, &theirs.regions);
        Ok((ours, peer))
    }

    /// Client side: creates this connection's queue pairs (no remote access: the node never
    /// initiates) and the request, which describes no regions; send
    /// [`Connecting::request`] and hand the answer to [`Connecting::finish`].
    pub fn connect(self: &Arc<Self>) -> Result<Connecting, RdmaError> {
        let (cq, qps, eps) = self.new_lanes(self.lanes, false)?;
        let local = self.endpoint(eps, Vec::new());
        Ok(Connecting {
            dev: self.clone(),
            cq,
            qps,
            local,
        })
    }
}

/// A client's queue pairs, created and waiting for the node's answer.
pub struct Connecting {
    dev: Arc<RdmaDevice>,
    cq: Arc<Cq>,
    qps: Vec<Qp>,
    local: RdmaEndpoint,
}

impl Connecting {
    /// The request to send on the data connection.
    pub fn request(&self) -> RdmaConnect {
        RdmaConnect {
            endpoint: self.local.clone(),
        }
    }

    /// Connects the queue pairs to the node's answer. A node may answer fewer lanes than
    /// asked (its own cap); the extra queue pairs are dropped. More than asked is refused.
    pub fn finish(mut self, answer: &RdmaEndpoint) -> Result<RdmaPeer, RdmaError> {
        if answer.qps.len() > self.qps.len() {
            return Err(RdmaError::Handshake(kvpool_proto::WireError::new(
                kvpool_proto::ErrorCode::InvalidArgument,
                format!(
                    "the node answered {} lanes, {} were asked",
                    answer.qps.len(),
                    self.qps.len()
                ),
            )));
        }
        let lanes = pair(&self.local, answer)?;
        self.qps.truncate(lanes.len());
        for (qp, lane) in self.qps.iter().zip(&lanes) {
            qp.connect(lane)?;
        }
        Ok(RdmaPeer::new(self.dev, self.cq, self.qps, &answer.regions))
    }
}

/// A connection's completion queue, its queue pairs and how the peer is to address them.
type NewLanes = (Arc<Cq>, Vec<Qp>, Vec<QpEndpoint>);

/// How long a batch waits, once every item has its outcome, for the device to finish with
/// requests still posted for failed items, before it destroys their queue pairs.
const SETTLE: Duration = Duration::from_millis(100);

/// One connection's lanes to a peer, and the peer's regions.
pub struct RdmaPeer {
    dev: Arc<RdmaDevice>,
    // Field order is drop order: queue pairs before their completion queue.
    lanes: Vec<Option<Qp>>,
    cq: Arc<Cq>,
    remote: RemoteRegions,
}

impl std::fmt::Debug for RdmaPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaPeer")
            .field("device", &self.dev.name())
            .field("live_lanes", &self.live_lanes())
            .finish()
    }
}

impl RdmaPeer {
    fn new(dev: Arc<RdmaDevice>, cq: Arc<Cq>, qps: Vec<Qp>, regions: &[RegionDesc]) -> Self {
        RdmaPeer {
            dev,
            lanes: qps.into_iter().map(Some).collect(),
            cq,
            remote: RemoteRegions::new(regions),
        }
    }

    /// Whether the peer described region `region` (one of a node's DRAM segments).
    pub fn has_region(&self, region: u64) -> bool {
        self.remote.contains(region)
    }

    /// Lanes still usable; a lane whose request failed or timed out is destroyed. At zero
    /// the connection must be set up again (or the peer reached over TCP).
    pub fn live_lanes(&self) -> usize {
        self.lanes.iter().flatten().count()
    }

    /// Runs a batch: one result per transfer, in order. Returns `Err` when the batch could
    /// not start (no live lane, invalid limits) or the completion queue failed (every lane is
    /// then destroyed); a failed request or the deadline fails only the items it touched.
    ///
    /// Returns only when the device no longer touches any of the batch's memory: every
    /// posted chain completed, or its queue pair was moved to the error state and destroyed
    /// (at the deadline, or after a failure on its lane).
    ///
    /// # Safety
    /// Every local piece must lie in memory registered with this device, and nothing else
    /// may read (for a READ, which writes it) or write it until this returns.
    pub unsafe fn run(
        &mut self,
        transfers: &[Transfer],
        timeout: Duration,
    ) -> Result<Vec<Result<(), RdmaError>>, RdmaError> {
        let live: Vec<usize> = (0..self.lanes.len())
            .filter(|&l| self.lanes[l].is_some())
            .collect();
        if live.is_empty() {
            return Err(RdmaError::Unavailable(
                "every lane of this connection failed; connect again".into(),
            ));
        }
        let started = Instant::now();
        let deadline = started + timeout;
        let mut plan = {
            let mut reg = self.dev.registry();
            let p = plan(transfers, &reg, &self.remote, live.len(), &self.dev.limits)?;
            for &addr in &p.local_regions {
                reg.pin(addr);
            }
            p
        };
        let epoch = self.dev.epoch.fetch_add(1, Ordering::Relaxed);
        let mut tracker = Tracker::new(&plan, epoch, started, deadline);
        let driven = self.drive(&plan, &mut tracker, &live);
        {
            let mut reg = self.dev.registry();
            for &addr in &plan.local_regions {
                reg.unpin(addr);
            }
        }
        driven?;
        Ok(tracker.results(&mut plan))
    }

    /// Posts and polls until every item has its outcome and the device holds none of the
    /// batch's requests. A failed completion queue stops every lane and fails the batch.
    fn drive(
        &mut self,
        plan: &Plan,
        tracker: &mut Tracker,
        live: &[usize],
    ) -> Result<(), RdmaError> {
        let mut wcs = vec![verbs::empty_wc(); 64];
        let mut settle_until: Option<Instant> = None;
        loop {
            let mut changed = false;
            for (l, c) in tracker.to_post(plan) {
                changed = true;
                let Some(qp) = self.lanes[live[l]].as_ref() else {
                    continue;
                };
                let id = tracker.wr_id(l, c, 0);
                // SAFETY: the pieces are registered and reserved for this batch (the
                // caller's promise); the batch does not return while the device holds them.
                let posted = unsafe { qp.post(&plan.lanes[l][c], id) };
                if let Err((index, e)) = posted {
                    tracker.post_failed(plan, l, c, index, e);
                }
            }
            let n = match self.cq.poll(&mut wcs) {
                Ok(n) => n,
                Err(e) => {
                    // The queue is unusable, so nothing tells when the device is done:
                    // destroying every lane is what makes it done.
                    for l in 0..live.len() {
                        self.destroy_lane(tracker, live, l);
                    }
                    return Err(e);
                }
            };
            for wc in &wcs[..n] {
                let status = match wc.error() {
                    None => Ok(()),
                    Some((status, vendor_err)) => Err(WcError {
                        status,
                        status_name: verbs::status_name(status),
                        vendor_err,
                    }),
                };
                tracker.complete(plan, wc.wr_id(), status);
            }
            if changed || n > 0 {
                // Lanes that failed are in the error state: destroy them so the device is
                // certainly done with their requests.
                for l in tracker.dead_lanes() {
                    if self.lanes[live[l]].is_some() {
                        self.destroy_lane(tracker, live, l);
                    }
                }
            }
            if tracker.is_done() && tracker.is_quiescent() {
                return Ok(());
            }
            let now = Instant::now();
            if tracker.is_done() {
                // Only requests of already-failed items are outstanding; give them a moment
                // to finish, then stop their lanes.
                let until = *settle_until.get_or_insert(now + SETTLE);
                if now >= until {
                    for l in 0..live.len() {
                        if !tracker.is_lane_quiescent(l) {
                            self.destroy_lane(tracker, live, l);
                        }
                    }
                }
            }
            for l in tracker.expire(plan, now) {
                self.destroy_lane(tracker, live, l);
            }
            if n == 0 {
                std::thread::yield_now();
            }
        }
    }

    /// Stops lane `l` of this batch for good: error state (the device stops processing its
    /// requests), then destroyed (the device lets go of them).
    fn destroy_lane(&mut self, tracker: &mut Tracker, live: &[usize], l: usize) {
        if let Some(qp) = self.lanes[live[l]].take() {
            if let Err(e) = qp.set_error() {
                tracing::warn!(error = %e, "moving a failed RDMA lane to the error state");
            }
            drop(qp);
        }
        tracker.forget_lane(l);
    }
}
