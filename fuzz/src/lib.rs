//! The checks the fuzz targets run, one per decoder, shared with the regression tests
//! (`tests/regressions.rs`) so that a crash found once is replayed on every test run.
//!
//! Each check feeds arbitrary bytes to a decoder and asserts what must hold for any input: it
//! returns (never panics, never allocates without bound), and whatever it accepts survives an
//! encode/decode round trip unchanged.

use kvpool_proto::{decode_body, encode_body, FrameHeader, FrameLimits, HEADER_LEN};
use serde::{de::DeserializeOwned, Serialize};

/// The frame header decoder, on raw bytes and on bytes whose checksum was made to match (so
/// the fuzzer gets past the crc32c and exercises the limits).
pub fn frame_header(data: &[u8]) {
    let limits = FrameLimits::default();
    let mut b = [0u8; HEADER_LEN];
    let n = data.len().min(HEADER_LEN);
    b[..n].copy_from_slice(&data[..n]);
    check_header(&b, &limits);
    // Magic, version and checksum fixed up: every field's validation is reached.
    b[0..3].copy_from_slice(&FrameHeader::request(0, 0, 0, 0).encode()[0..3]);
    let crc = kvpool_proto::crc32c::crc32c(&b[0..28]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    check_header(&b, &limits);
}

fn check_header(b: &[u8; HEADER_LEN], limits: &FrameLimits) {
    if let Ok(h) = FrameHeader::decode(b, limits) {
        let again = h.encode();
        assert_eq!(FrameHeader::decode(&again, limits), Ok(h), "round trip");
        // Every byte but the reserved one (5, ignored on decode) is reproduced.
        let differs = (0..HEADER_LEN).filter(|&i| i != 5 && i < 28 && again[i] != b[i]);
        assert_eq!(differs.count(), 0, "re-encoding changes the header");
        assert!(h.body_len <= limits.max_body && h.payload_len <= limits.max_payload);
    }
}

/// One message type's decoder: what it accepts encodes to bytes that decode to the same.
fn round_trip<T: Serialize + DeserializeOwned>(body: &[u8]) {
    if let Ok(v) = decode_body::<T>(body) {
        let e1 = encode_body(&v);
        let w: T = decode_body(&e1).expect("an encoding decodes");
        assert_eq!(encode_body(&w), e1, "re-encoding is stable");
    }
}

macro_rules! message_checks {
    ($($t:ident),* $(,)?) => {
        /// Every message's decoder (requests and responses, master, storage node and P/D
        /// hand-off): the first byte picks the type, the rest is the body.
        pub fn messages(data: &[u8]) {
            const CHECKS: &[fn(&[u8])] = &[$(round_trip::<kvpool_proto::$t>),*];
            let Some((&pick, body)) = data.split_first() else { return };
            CHECKS[pick as usize % CHECKS.len()](body);
        }

        /// The message type names, in the order the first byte picks them (for the corpus).
        pub const MESSAGE_TYPES: &[&str] = &[$(stringify!($t)),*];
    };
}

message_checks!(
    Hello,
    HelloResponse,
    PutStart,
    PutStartResponse,
    PutEnd,
    PutRevoke,
    UnitResponse,
    GetReplicas,
    GetReplicasResponse,
    Exists,
    ExistsResponse,
    Remove,
    RemoveAll,
    RemoveAllResponse,
    Status,
    StatusResponse,
    Drain,
    DrainResponse,
    ListKeys,
    ListKeysResponse,
    RemoveRegex,
    Register,
    RegisterResponse,
    Heartbeat,
    HeartbeatResponse,
    Leave,
    Read,
    Write,
    HandoffClaim,
    HandoffClaimResponse,
    HandoffDone,
    HandoffAbort,
    HandoffAck,
    Local,
    LocalResponse,
    MasterIndex,
    MasterIndexResponse,
    Touch,
);

/// The master's configuration section as a file gives it: parsing never panics, and what
/// parses either validates or is refused with a message naming a `master.` key.
pub fn master_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = toml::from_str::<kvpool_master::config::MasterConfig>(text) {
        if let Err(e) = cfg.validate() {
            assert!(e.starts_with("master."), "unnamed config error: {e}");
        }
    }
}

/// The NVMe record header a restarted node reads back from its disk (possibly torn or
/// overwritten): raw, and with magic, version and header checksum made to match, so the
/// key-length checks and the fields are reached. What decodes re-encodes to a header that
/// decodes to the same fields and key.
pub fn nvme_record_header(data: &[u8]) {
    use kvpool_store::nvme::layout::{
        decode_header, encode_header, LayoutError, RecordHeader, HEADER_CRC_AT, HEADER_LEN,
    };
    let _ = decode_header(data);
    let mut block = data.to_vec();
    if block.len() < HEADER_LEN {
        block.resize(HEADER_LEN, 0);
    }
    // A valid record's magic and version (the first six bytes), as the encoder writes them.
    let mut valid = vec![0u8; HEADER_LEN];
    let empty = RecordHeader {
        replica: 0,
        key_len: 0,
        value_len: 0,
        value_crc: 0,
    };
    encode_header(&empty, &[], &mut valid);
    block[..6].copy_from_slice(&valid[..6]);
    // The decoder reports the checksum it computed: store it, and the header is intact.
    if let Err(LayoutError::HeaderChecksum { actual, .. }) = decode_header(&block) {
        block[HEADER_CRC_AT..HEADER_CRC_AT + 4].copy_from_slice(&actual.to_le_bytes());
    }
    if let Ok((h, key)) = decode_header(&block) {
        let mut out = vec![0u8; HEADER_LEN + key.len()];
        encode_header(&h, key, &mut out);
        let (h2, key2) = decode_header(&out).expect("an encoded header decodes");
        assert_eq!((h2, key2), (h, key), "round trip");
    }
}

/// The storage node's configuration section (`[store]`, `toml` into `StoreConfig`):
/// parsing never panics, `validate` never panics, and what parses writes back to TOML that
/// parses to the same configuration (what `kvpool config` prints is what the node runs).
pub fn store_config(data: &[u8]) {
    use kvpool_store::config::StoreConfig;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = toml::from_str::<StoreConfig>(text) {
        let _ = cfg.validate();
        let again = toml::to_string(&cfg).expect("a parsed config serializes");
        let back: StoreConfig = toml::from_str(&again).expect("a written config parses");
        assert_eq!(back, cfg, "round trip");
    }
}

/// Token ids a namespace is tried on: a few blocks of the smallest sizes.
const NAMESPACE_TOKENS: [u32; 64] = {
    let mut t = [0u32; 64];
    let mut i = 0;
    while i < 64 {
        t[i] = i as u32 * 7919;
        i += 1;
    }
    t
};

/// The proxy's engine key namespace (`kvpool proxy --prefix-namespace JSON`): parsing never
/// panics, and a namespace it accepts hashes a prompt without panicking (a `block_size`
/// beyond the prompt makes no key), into keys whose hand-off form parses back.
pub fn proxy_namespace(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(ns) = kvpool_proxy::KeyNamespace::parse(text) else {
        return;
    };
    assert!(ns.block_size > 0 && ns.layout.contains('/'));
    let hasher = kvpool_connector::BlockHasher::new(kvpool_connector::Namespace {
        model: ns.model,
        kv_dtype: ns.kv_dtype,
        layout: ns.layout,
        block_size: ns.block_size,
        tp_rank: 0,
        tp_size: ns.tp_size,
        pp_rank: 0,
        pp_size: ns.pp_size,
    });
    let keys = hasher.keys(&NAMESPACE_TOKENS);
    assert_eq!(keys.len(), 64 / ns.block_size as usize);
    for k in keys {
        let p = k.to_param();
        assert_eq!(kvpool_connector::BlockKey::from_param(&p), Some(k));
    }
}

/// The P/D hand-off's parameters, the first byte picking which:
/// - even: the environment a worker reads (`PdConfig::from_lookup`), the rest split at NUL
///   into values of the variables it knows, ranks from the next bytes. Never panics; what it
///   accepts has a bootstrap port, and a refusal is a configuration error.
/// - odd: the `kv_transfer_params` JSON engines pass through the proxy (`HandoffParams`).
///   Never panics; accepted block keys write back to the same strings.
pub fn pd_params(data: &[u8]) {
    use kvpool_connector::pd::{HandoffParams, PdConfig, PdError, Role};
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    if pick % 2 == 1 {
        let Ok(params) = serde_json::from_slice::<HandoffParams>(rest) else {
            return;
        };
        if let Ok(keys) = params.keys() {
            for (k, s) in keys.iter().zip(&params.block_keys) {
                assert_eq!(k.to_param().to_ascii_lowercase(), s.to_ascii_lowercase());
            }
        }
        return;
    }
    const VARS: [&str; 7] = [
        "KVPOOL_BOOTSTRAP_PORT",
        "VLLM_MOONCAKE_BOOTSTRAP_PORT",
        "KVPOOL_ABORT_REQUEST_TIMEOUT",
        "VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT",
        "KVPOOL_CONSUMER_TIMEOUT",
        "KVPOOL_BOOTSTRAP_HOST",
        "KVPOOL_TOKEN",
    ];
    let (ranks, values) = rest.split_at(rest.len().min(6));
    let rank = |i: usize| u32::from(ranks.get(i).copied().unwrap_or(0));
    let values: Vec<String> = values
        .split(|&b| b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    // Bytes 0..4: role, dp_rank (scaled, to reach the port overflow), tp_size, tp_rank;
    // byte 5: bit i says whether variable i is set (to the next value in turn).
    let set = ranks.get(5).copied().unwrap_or(0xff);
    let mut env = Vec::new();
    let mut next = values.iter();
    for (i, name) in VARS.iter().enumerate() {
        if set & (1 << (i % 8)) != 0 {
            if let Some(v) = next.next() {
                env.push((*name, v.clone()));
            }
        }
    }
    let role = [Role::None, Role::Producer, Role::Consumer, Role::Both][rank(0) as usize % 4];
    let lookup = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
    match PdConfig::from_lookup(role, rank(1) * 257, rank(2), rank(3), lookup) {
        Ok(cfg) => {
            let port = cfg.bootstrap_port().expect("an accepted config has a port");
            assert!(cfg.base_port == 0 || port >= cfg.base_port);
        }
        Err(e) => assert!(matches!(e, PdError::Config(_)), "{e}"),
    }
}
