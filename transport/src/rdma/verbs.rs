//! Owning wrappers of the libibverbs objects this transport uses, through `ibverbs-sys` (the
//! FFI layer of the `ibverbs` crate; see `docs/rdma.md` for why not its safe layer).
//!
//! Each wrapper holds an `Arc` of what it was created from, so objects are destroyed in the
//! order verbs requires (queue pairs and memory regions before their protection domain, the
//! domain and queues before the device context) whatever order their owners drop them in.
//! libibverbs objects may be used from any thread (the library locks internally), which is
//! what the `Send`/`Sync` impls below rely on.

use std::{
    ffi::CStr,
    io, ptr,
    sync::{Arc, OnceLock},
};

use ibverbs_sys as ffi;

use super::{
    completion::{WcError, WrId},
    handshake::LaneParams,
    plan::{Op, WorkRequest},
    RdmaError,
};

fn verbs(call: &'static str, source: io::Error) -> RdmaError {
    RdmaError::Verbs { call, source }
}

/// `errno` as an error, for calls that return NULL and set it.
fn last_os(call: &'static str) -> RdmaError {
    verbs(call, io::Error::last_os_error())
}

/// A returned error number as an error, for calls that return it.
fn check(call: &'static str, rc: i32) -> Result<(), RdmaError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(verbs(call, io::Error::from_raw_os_error(rc.abs())))
    }
}

/// Makes registered memory safe across `fork()` (Python's `multiprocessing`, a shell-out):
/// `ibv_fork_init` once per process, before any other verbs call, as libibverbs requires.
/// Without it a child's copy-on-write of a pinned page can leave the device writing to memory
/// the parent no longer sees. A failure is not fatal (kernels that copy pinned pages on fork
/// need nothing): it is logged and the device used anyway. Returns the first call's outcome.
pub(crate) fn fork_safe() -> &'static Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        // SAFETY: takes no arguments; called once, before this process's first other verbs
        // call (every verbs call starts with `Context::open`, which calls this first).
        let rc = unsafe { ffi::ibv_fork_init() };
        let r = check("ibv_fork_init", rc).map_err(|e| e.to_string());
        if let Err(why) = &r {
            tracing::warn!("RDMA memory is not fork-safe in this process: {why}");
        }
        r
    })
}

/// An open device.
pub(crate) struct Context {
    ctx: *mut ffi::ibv_context,
    pub name: String,
}

// SAFETY: a verbs context may be used from any thread; libibverbs serializes what needs it.
unsafe impl Send for Context {}
// SAFETY: as above; every method takes `&self` and the library does its own locking.
unsafe impl Sync for Context {}

impl Context {
    /// Opens the device called `name`, or the first one. No device (or no kernel support for
    /// RDMA at all) is [`RdmaError::Unavailable`].
    pub fn open(name: Option<&str>) -> Result<Context, RdmaError> {
        let _ = fork_safe();
        let mut n = 0i32;
        // SAFETY: `n` is a valid out-pointer; the list is freed below on every path.
        let list = unsafe { ffi::ibv_get_device_list(&mut n) };
        if list.is_null() {
            let e = io::Error::last_os_error();
            return Err(RdmaError::Unavailable(format!(
                "cannot list RDMA devices (no kernel RDMA support?): {e}"
            )));
        }
        // SAFETY: libibverbs returned `n` valid device pointers at `list`.
        let devices = unsafe { std::slice::from_raw_parts(list, n.max(0) as usize) };
        let named = |d: &*mut ffi::ibv_device| {
            // SAFETY: `d` is a device of the live list; the name is a NUL-terminated string
            // owned by the device.
            let p = unsafe { ffi::ibv_get_device_name(*d) };
            if p.is_null() {
                String::new()
            } else {
                // SAFETY: non-null, NUL-terminated, valid while the list lives.
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            }
        };
        let found = devices
            .iter()
            .find(|d| name.is_none_or(|want| named(d) == want))
            .map(|d| (*d, named(d)));
        let result = match found {
            None if devices.is_empty() => Err(RdmaError::Unavailable("no RDMA device".into())),
            None => Err(RdmaError::Unavailable(format!(
                "no RDMA device named {:?} (have {:?})",
                name.unwrap_or(""),
                devices.iter().map(named).collect::<Vec<_>>()
            ))),
            Some((dev, dev_name)) => {
                // SAFETY: `dev` is a device of the live list.
                let ctx = unsafe { ffi::ibv_open_device(dev) };
                if ctx.is_null() {
                    Err(RdmaError::Unavailable(format!(
                        "cannot open RDMA device {dev_name}: {}",
                        io::Error::last_os_error()
                    )))
                } else {
                    Ok(Context {
                        ctx,
                        name: dev_name,
                    })
                }
            }
        };
        // SAFETY: `list` came from ibv_get_device_list; an opened context stays valid after.
        unsafe { ffi::ibv_free_device_list(list) };
        result
    }

    pub fn query_device(&self) -> Result<ffi::ibv_device_attr, RdmaError> {
        let mut attr = ffi::ibv_device_attr::default();
        // SAFETY: a live context and a valid out-pointer.
        check("ibv_query_device", unsafe {
            ffi::ibv_query_device(self.ctx, &mut attr)
        })?;
        Ok(attr)
    }

    pub fn query_port(&self, port: u8) -> Result<ffi::ibv_port_attr, RdmaError> {
        let mut attr = ffi::ibv_port_attr::default();
        // SAFETY: a live context; `_compat_ibv_port_attr` is the leading part of
        // `ibv_port_attr` (the library writes no more than the compat struct through it).
        check("ibv_query_port", unsafe {
            ffi::ibv_query_port(
                self.ctx,
                port,
                (&mut attr as *mut ffi::ibv_port_attr).cast(),
            )
        })?;
        Ok(attr)
    }

    pub fn query_gid(&self, port: u8, index: u8) -> Result<[u8; 16], RdmaError> {
        let mut gid = ffi::ibv_gid::default();
        // SAFETY: a live context and a valid out-pointer.
        check("ibv_query_gid", unsafe {
            ffi::ibv_query_gid(self.ctx, port, i32::from(index), &mut gid)
        })?;
        // SAFETY: every bit pattern is a valid `[u8; 16]`; `raw` is the union's byte view.
        Ok(unsafe { gid.raw })
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: everything created from it holds an Arc of it, so nothing uses it now.
        let rc = unsafe { ffi::ibv_close_device(self.ctx) };
        if rc != 0 {
            tracing::warn!(device = %self.name, rc, "ibv_close_device failed");
        }
    }
}

/// A protection domain.
pub(crate) struct Pd {
    pd: *mut ffi::ibv_pd,
    _ctx: Arc<Context>,
}

// SAFETY: see `Context`.
unsafe impl Send for Pd {}
// SAFETY: see `Context`.
unsafe impl Sync for Pd {}

impl Pd {
    pub fn new(ctx: Arc<Context>) -> Result<Pd, RdmaError> {
        // SAFETY: a live context.
        let pd = unsafe { ffi::ibv_alloc_pd(ctx.ctx) };
        if pd.is_null() {
            return Err(last_os("ibv_alloc_pd"));
        }
        Ok(Pd { pd, _ctx: ctx })
    }
}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: queue pairs and memory regions hold an Arc of it, so none is left.
        let rc = unsafe { ffi::ibv_dealloc_pd(self.pd) };
        if rc != 0 {
            tracing::warn!(rc, "ibv_dealloc_pd failed");
        }
    }
}

/// A registered memory region.
pub(crate) struct Mr {
    mr: *mut ffi::ibv_mr,
    _pd: Arc<Pd>,
}

// SAFETY: see `Context`.
unsafe impl Send for Mr {}
// SAFETY: see `Context`.
unsafe impl Sync for Mr {}

impl Mr {
    /// Registers `[addr, addr + len)` for local writes and, when `remote`, remote reads and
    /// writes.
    ///
    /// # Safety
    /// The memory must stay mapped until the region is dropped.
    pub unsafe fn register(
        pd: &Arc<Pd>,
        addr: u64,
        len: u64,
        remote: bool,
    ) -> Result<Mr, RdmaError> {
        let access = access_flags(remote);
        // SAFETY: a live PD; the caller keeps the memory mapped while registered.
        let mr = unsafe { ffi::ibv_reg_mr(pd.pd, addr as *mut _, len as usize, access.0 as i32) };
        if mr.is_null() {
            return Err(last_os("ibv_reg_mr"));
        }
        Ok(Mr {
            mr,
            _pd: pd.clone(),
        })
    }

    pub fn keys(&self) -> (u32, u32) {
        // SAFETY: a live MR; the keys never change after registration.
        let mr = unsafe { &*self.mr };
        (mr.lkey, mr.rkey)
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: the registry hands an MR out for dropping only when no batch uses it.
        let rc = unsafe { ffi::ibv_dereg_mr(self.mr) };
        if rc != 0 {
            tracing::warn!(rc, "ibv_dereg_mr failed");
        }
    }
}

/// Local write always (a READ lands in local memory); remote read and write when peers may
/// use the memory or queue pair.
fn access_flags(remote: bool) -> ffi::ibv_access_flags {
    let local = ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE;
    if remote {
        local
            | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
            | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_READ
    } else {
        local
    }
}

/// A completion queue.
pub(crate) struct Cq {
    cq: *mut ffi::ibv_cq,
    _ctx: Arc<Context>,
}

// SAFETY: see `Context`.
unsafe impl Send for Cq {}
// SAFETY: see `Context`.
unsafe impl Sync for Cq {}

/// A zeroed work completion to poll into.
pub(crate) fn empty_wc() -> ffi::ibv_wc {
    // SAFETY: `ibv_wc` is a plain C struct of integers, valid when all zero.
    unsafe { std::mem::zeroed() }
}

impl Cq {
    pub fn new(ctx: Arc<Context>, entries: i32) -> Result<Cq, RdmaError> {
        // SAFETY: a live context; no completion channel, no context pointer.
        let cq =
            unsafe { ffi::ibv_create_cq(ctx.ctx, entries, ptr::null_mut(), ptr::null_mut(), 0) };
        if cq.is_null() {
            return Err(last_os("ibv_create_cq"));
        }
        Ok(Cq { cq, _ctx: ctx })
    }

    /// Takes up to `wcs.len()` completions without blocking; returns how many.
    pub fn poll(&self, wcs: &mut [ffi::ibv_wc]) -> Result<usize, RdmaError> {
        // SAFETY: a live CQ; `ibv_poll_cq` is an inline in verbs.h that calls the provider's
        // `poll_cq` op through the context, which is what this does.
        let n = unsafe {
            let ctx = (*self.cq).context;
            match (*ctx).ops.poll_cq {
                Some(poll) => poll(self.cq, wcs.len() as i32, wcs.as_mut_ptr()),
                None => -1,
            }
        };
        if n < 0 {
            return Err(verbs(
                "ibv_poll_cq",
                io::Error::other("the provider failed"),
            ));
        }
        Ok(n as usize)
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: queue pairs using it hold an Arc of it, so none is left.
        let rc = unsafe { ffi::ibv_destroy_cq(self.cq) };
        if rc != 0 {
            tracing::warn!(rc, "ibv_destroy_cq failed");
        }
    }
}

/// The name libibverbs gives a completion status.
pub(crate) fn status_name(status: u32) -> &'static str {
    // SAFETY: returns a pointer to a static string (or "unknown").
    let p = unsafe { ffi::ibv_wc_status_str(status) };
    if p.is_null() {
        return "unknown";
    }
    // SAFETY: non-null, NUL-terminated, static.
    unsafe { CStr::from_ptr(p) }.to_str().unwrap_or("unknown")
}

/// How a queue pair connects: the port, routing and retry settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QpConfig {
    pub port: u8,
    pub gid_index: u8,
    pub max_send_wr: u32,
    pub max_sge: u32,
    /// Outstanding RDMA READs this QP may have in flight as initiator.
    pub max_rd_atomic: u8,
    /// Outstanding RDMA READs it accepts as responder.
    pub max_dest_rd_atomic: u8,
    /// Local ACK timeout exponent: 4.096 µs × 2^timeout.
    pub ack_timeout: u8,
    pub retry_cnt: u8,
    /// Whether the peer may READ and WRITE through this QP (a node's, not a client's).
    pub remote_access: bool,
}

/// A reliable-connection queue pair.
pub(crate) struct Qp {
    qp: *mut ffi::ibv_qp,
    cfg: QpConfig,
    _pd: Arc<Pd>,
    _cq: Arc<Cq>,
}

// SAFETY: see `Context`.
unsafe impl Send for Qp {}
// SAFETY: see `Context`.
unsafe impl Sync for Qp {}

fn mtu_enum(bytes: u16) -> ffi::ibv_mtu {
    match bytes {
        256 => ffi::IBV_MTU_256,
        512 => ffi::IBV_MTU_512,
        1024 => ffi::IBV_MTU_1024,
        2048 => ffi::IBV_MTU_2048,
        _ => ffi::IBV_MTU_4096,
    }
}

/// The MTU in bytes of an `ibv_mtu` (1 = 256 … 5 = 4096).
pub(crate) fn mtu_bytes(mtu: ffi::ibv_mtu) -> u16 {
    128u16 << mtu.clamp(1, 5)
}

impl Qp {
    pub fn new(pd: &Arc<Pd>, cq: &Arc<Cq>, cfg: QpConfig) -> Result<Qp, RdmaError> {
        let mut init = ffi::ibv_qp_init_attr {
            send_cq: cq.cq,
            recv_cq: cq.cq,
            cap: ffi::ibv_qp_cap {
                max_send_wr: cfg.max_send_wr,
                max_recv_wr: 1,
                max_send_sge: cfg.max_sge,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: ffi::ibv_qp_type::IBV_QPT_RC,
            sq_sig_all: 0,
            ..Default::default()
        };
        // SAFETY: a live PD and CQ; `init` is a valid attribute block.
        let qp = unsafe { ffi::ibv_create_qp(pd.pd, &mut init) };
        if qp.is_null() {
            return Err(last_os("ibv_create_qp"));
        }
        Ok(Qp {
            qp,
            cfg,
            _pd: pd.clone(),
            _cq: cq.clone(),
        })
    }

    pub fn qp_num(&self) -> u32 {
        // SAFETY: a live QP; its number never changes.
        unsafe { (*self.qp).qp_num }
    }

    fn modify(
        &self,
        attr: &mut ffi::ibv_qp_attr,
        mask: ffi::ibv_qp_attr_mask,
    ) -> Result<(), RdmaError> {
        // SAFETY: a live QP and a valid attribute block for the mask.
        check("ibv_modify_qp", unsafe {
            ffi::ibv_modify_qp(self.qp, attr, mask.0 as i32)
        })
    }

    /// RESET → INIT → RTR → RTS against the peer described by `lane`.
    pub fn connect(&self, lane: &LaneParams) -> Result<(), RdmaError> {
        use ffi::ibv_qp_attr_mask as m;
        let cfg = self.cfg;
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_INIT,
            pkey_index: 0,
            port_num: cfg.port,
            qp_access_flags: access_flags(cfg.remote_access).0,
            ..Default::default()
        };
        self.modify(
            &mut attr,
            m::IBV_QP_STATE | m::IBV_QP_PKEY_INDEX | m::IBV_QP_PORT | m::IBV_QP_ACCESS_FLAGS,
        )?;

        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTR,
            path_mtu: mtu_enum(lane.path_mtu),
            dest_qp_num: lane.dest_qp_num,
            rq_psn: lane.rq_psn,
            max_dest_rd_atomic: cfg.max_dest_rd_atomic,
            min_rnr_timer: 12,
            ah_attr: ffi::ibv_ah_attr {
                dlid: lane.dlid,
                sl: 0,
                src_path_bits: 0,
                port_num: cfg.port,
                ..Default::default()
            },
            ..Default::default()
        };
        if let Some(gid) = lane.dgid {
            attr.ah_attr.is_global = 1;
            attr.ah_attr.grh.dgid = ffi::ibv_gid { raw: gid };
            attr.ah_attr.grh.sgid_index = cfg.gid_index;
            attr.ah_attr.grh.hop_limit = 0xff;
        }
        self.modify(
            &mut attr,
            m::IBV_QP_STATE
                | m::IBV_QP_AV
                | m::IBV_QP_PATH_MTU
                | m::IBV_QP_DEST_QPN
                | m::IBV_QP_RQ_PSN
                | m::IBV_QP_MAX_DEST_RD_ATOMIC
                | m::IBV_QP_MIN_RNR_TIMER,
        )?;

        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTS,
            sq_psn: lane.sq_psn,
            timeout: cfg.ack_timeout,
            retry_cnt: cfg.retry_cnt,
            rnr_retry: 7,
            max_rd_atomic: cfg.max_rd_atomic,
            ..Default::default()
        };
        self.modify(
            &mut attr,
            m::IBV_QP_STATE
                | m::IBV_QP_SQ_PSN
                | m::IBV_QP_TIMEOUT
                | m::IBV_QP_RETRY_CNT
                | m::IBV_QP_RNR_RETRY
                | m::IBV_QP_MAX_QP_RD_ATOMIC,
        )
    }

    /// Moves the QP to the error state: the device stops working on (and flushes) every
    /// request posted to it.
    pub fn set_error(&self) -> Result<(), RdmaError> {
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_ERR,
            ..Default::default()
        };
        self.modify(&mut attr, ffi::ibv_qp_attr_mask::IBV_QP_STATE)
    }

    /// Posts `chain` as one linked list of READ/WRITE work requests, ids from `id` (its
    /// `index` counts up). On refusal, returns the index of the first request not posted.
    ///
    /// # Safety
    /// Every entry must name registered memory that stays valid, and is touched by nothing
    /// else, until the chain's completion is polled or the QP is destroyed.
    pub unsafe fn post(&self, chain: &[WorkRequest], id: WrId) -> Result<(), (usize, WcError)> {
        let mut list = WrList::new(chain, id);
        let Some(first) = list.wrs.first_mut() else {
            return Ok(());
        };
        let first: *mut ffi::ibv_send_wr = first;
        let mut bad: *mut ffi::ibv_send_wr = ptr::null_mut();
        // SAFETY: a live QP; the list and its entries live until the call returns (the
        // provider copies them into the send queue); the memory they name is the caller's
        // promise. `ibv_post_send` is an inline that calls the provider's op, as here.
        let rc = unsafe {
            let ctx = (*self.qp).context;
            match (*ctx).ops.post_send {
                Some(post) => post(self.qp, first, &mut bad),
                None => ENOSYS,
            }
        };
        if rc == 0 {
            return Ok(());
        }
        let index = if bad.is_null() {
            0
        } else {
            // SAFETY: `bad` points into `list.wrs`, per the verbs contract.
            unsafe { bad.offset_from(list.wrs.as_ptr()) }.max(0) as usize
        };
        Err((
            index,
            WcError {
                status: u32::MAX,
                status_name: "post refused",
                vendor_err: rc.unsigned_abs(),
            },
        ))
    }
}

/// A chain in verbs form: each request's scatter/gather entries, and the requests linked in
/// order. The requests point into the entries' and each other's heap buffers, which moving
/// the `WrList` does not move; nothing resizes them after `new`.
struct WrList {
    _sges: Vec<Vec<ffi::ibv_sge>>,
    wrs: Vec<ffi::ibv_send_wr>,
}

impl WrList {
    fn new(chain: &[WorkRequest], id: WrId) -> WrList {
        let mut sges: Vec<Vec<ffi::ibv_sge>> = chain
            .iter()
            .map(|wr| {
                wr.sges
                    .iter()
                    .map(|s| ffi::ibv_sge {
                        addr: s.addr,
                        length: s.len,
                        lkey: s.lkey,
                    })
                    .collect()
            })
            .collect();
        let mut wrs: Vec<ffi::ibv_send_wr> = chain
            .iter()
            .zip(&mut sges)
            .enumerate()
            .map(|(i, (wr, sg))| {
                let mut w = ffi::ibv_send_wr {
                    wr_id: WrId {
                        index: i as u16,
                        ..id
                    }
                    .encode(),
                    sg_list: sg.as_mut_ptr(),
                    num_sge: sg.len() as i32,
                    opcode: match wr.op {
                        Op::Read => ffi::ibv_wr_opcode::IBV_WR_RDMA_READ,
                        Op::Write => ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE,
                    },
                    send_flags: if wr.signaled {
                        ffi::ibv_send_flags::IBV_SEND_SIGNALED.0
                    } else {
                        0
                    },
                    ..Default::default()
                };
                w.wr.rdma = ffi::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 {
                    remote_addr: wr.remote_addr,
                    rkey: wr.rkey,
                };
                w
            })
            .collect();
        for i in 1..wrs.len() {
            let next: *mut ffi::ibv_send_wr = &mut wrs[i];
            wrs[i - 1].next = next;
        }
        WrList { _sges: sges, wrs }
    }
}

/// What a provider without `post_send` amounts to.
const ENOSYS: i32 = 38;

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: a live QP; destroying it ends the device's access to every buffer its
        // requests named (the batch that posted them has returned or is being torn down).
        let rc = unsafe { ffi::ibv_destroy_qp(self.qp) };
        if rc != 0 {
            tracing::warn!(rc, "ibv_destroy_qp failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rdma::plan::Sge;

    #[test]
    fn mtus_map_both_ways() {
        for bytes in kvpool_proto::rdma::MTUS {
            assert_eq!(mtu_bytes(mtu_enum(bytes)), bytes);
        }
        assert_eq!(mtu_bytes(ffi::IBV_MTU_1024), 1024);
    }

    #[test]
    fn fork_safety_is_set_up_once_before_any_device_is_opened() {
        // Runs without a device: `ibv_fork_init` is the library's own either way.
        let first = fork_safe();
        let _ = Context::open(None);
        assert!(std::ptr::eq(first, fork_safe()), "called once per process");
        // SAFETY: takes no arguments; only reads the library's state.
        let status = unsafe { ffi::ibv_is_fork_initialized() };
        if first.is_ok() {
            assert_ne!(status, ffi::IBV_FORK_DISABLED, "{first:?}");
        }
    }

    #[test]
    fn status_names_come_from_libibverbs() {
        // Runs without a device: the strings are the library's own.
        assert_eq!(status_name(0), "success");
        assert_eq!(status_name(5), "Work Request Flushed Error");
    }

    #[test]
    fn a_chain_becomes_a_linked_list_of_one_sided_requests() {
        let wr = |op, signaled, sges: Vec<Sge>| WorkRequest {
            item: 0,
            op,
            remote_addr: 0x9000,
            rkey: 0x77,
            sges,
            signaled,
        };
        let sge = |addr, len| Sge { addr, len, lkey: 5 };
        let chain = vec![
            wr(Op::Read, false, vec![sge(0x100, 10), sge(0x200, 20)]),
            wr(Op::Write, false, vec![sge(0x300, 30)]),
            wr(Op::Read, true, vec![sge(0x400, 40)]),
        ];
        let id = WrId {
            epoch: 9,
            lane: 2,
            chain: 4,
            index: 0,
        };
        let list = WrList::new(&chain, id);
        let w = &list.wrs;
        assert_eq!(w.len(), 3);
        for (i, r) in w.iter().enumerate() {
            assert_eq!(
                WrId::decode(r.wr_id),
                WrId {
                    index: i as u16,
                    ..id
                }
            );
            let next = if i + 1 < w.len() {
                &w[i + 1] as *const ffi::ibv_send_wr
            } else {
                ptr::null()
            };
            assert_eq!(r.next as *const _, next, "request {i} links to the next");
            assert_eq!(r.num_sge as usize, chain[i].sges.len());
            // SAFETY: `sg_list` points at `num_sge` entries owned by `list`.
            let sg = unsafe { std::slice::from_raw_parts(r.sg_list, r.num_sge as usize) };
            for (e, want) in sg.iter().zip(&chain[i].sges) {
                assert_eq!((e.addr, e.length, e.lkey), (want.addr, want.len, want.lkey));
            }
            // SAFETY: `rdma` is the union member `new` wrote.
            let rdma = unsafe { r.wr.rdma };
            assert_eq!((rdma.remote_addr, rdma.rkey), (0x9000, 0x77));
        }
        assert_eq!(w[0].opcode, ffi::ibv_wr_opcode::IBV_WR_RDMA_READ);
        assert_eq!(w[1].opcode, ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE);
        let signaled: Vec<bool> = w.iter().map(|r| r.send_flags != 0).collect();
        assert_eq!(signaled, vec![false, false, true]);
        assert_eq!(w[2].send_flags, ffi::ibv_send_flags::IBV_SEND_SIGNALED.0);
    }
}
