//! Replays every kept input through its check: the committed seed corpus
//! (`corpus/TARGET/seed-*`) and every input that ever crashed a target
//! (`regressions/TARGET/*`). Runs without libFuzzer (`cargo test` in fuzz/), so a crash found
//! once fails the ordinary test run until it is fixed.

use std::path::Path;

use kvpool_proto::*;

type Check = fn(&[u8]);

const TARGETS: &[(&str, Check)] = &[
    ("frame_header", kvpool_fuzz::frame_header),
    ("messages", kvpool_fuzz::messages),
    ("master_config", kvpool_fuzz::master_config),
    ("nvme_record_header", kvpool_fuzz::nvme_record_header),
    ("store_config", kvpool_fuzz::store_config),
    ("proxy_namespace", kvpool_fuzz::proxy_namespace),
    ("pd_params", kvpool_fuzz::pd_params),
];

fn replay(dir: &Path, check: Check) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries {
        let path = e.expect("dir entry").path();
        let data = std::fs::read(&path).expect("read input");
        // A panic names the input, for `scripts/fuzz.sh`-style reproduction.
        let r = std::panic::catch_unwind(|| check(&data));
        assert!(r.is_ok(), "{} fails its check", path.display());
        n += 1;
    }
    n
}

#[test]
fn kept_inputs_pass_their_checks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut seeds = 0;
    for (name, check) in TARGETS {
        seeds += replay(&root.join("corpus").join(name), *check);
        replay(&root.join("regressions").join(name), *check);
    }
    assert!(
        seeds > 0,
        "the seed corpus is committed (see seeds_are_valid_inputs)"
    );
}

/// A message seed: the type's index (the first byte `messages` reads), then its body.
fn message_seed<T: serde::Serialize>(name: &str, msg: &T) -> (String, Vec<u8>) {
    let idx = kvpool_fuzz::MESSAGE_TYPES
        .iter()
        .position(|t| *t == name)
        .unwrap_or_else(|| panic!("{name} is not a checked message type"));
    let mut b = vec![idx as u8];
    b.extend(encode_body(msg));
    (format!("seed-{name}"), b)
}

/// Valid inputs for each target, so the fuzzer starts from accepted bytes; written to
/// `corpus/` with `KVPOOL_FUZZ_WRITE_SEEDS=1`, checked here either way.
#[test]
fn seeds_are_valid_inputs() {
    let tag = ObjectTag {
        replica: ReplicaId(7),
        key: b"block/0".to_vec(),
        segment: SegmentId(1),
        offset: 4096,
        len: 100,
        checksum: 9,
    };
    let messages = vec![
        message_seed(
            "Hello",
            &Hello {
                token: b"secret".to_vec(),
                client_version: 1,
            },
        ),
        message_seed(
            "PutStart",
            &PutStart {
                client: ClientId(3),
                items: vec![PutStartItem {
                    key: b"k".to_vec(),
                    len: 100,
                    options: PutOptions::default(),
                }],
            },
        ),
        message_seed(
            "GetReplicas",
            &GetReplicas {
                keys: vec![b"a".to_vec(), b"bb".to_vec()],
            },
        ),
        message_seed(
            "Exists",
            &Exists {
                keys: vec![b"a".to_vec()],
                lease: true,
            },
        ),
        message_seed(
            "Write",
            &Write {
                ops: vec![WriteOp {
                    segment: SegmentId(1),
                    offset: 4096,
                    len: 100,
                }],
                tags: vec![tag.clone()],
            },
        ),
        message_seed(
            "Heartbeat",
            &Heartbeat {
                node: NodeId(5),
                acked: 3,
                done: vec![TaskDone {
                    id: 1,
                    result: Err(WireError::new(ErrorCode::Io, "eio")),
                }],
                unhealthy: vec![SegmentId(2)],
                lost: vec![ReplicaId(8)],
            },
        ),
        message_seed(
            "HeartbeatResponse",
            &HeartbeatResponse {
                need_register: false,
                frees: vec![ReplicaId(1)],
                frees_upto: 4,
                tasks: Vec::new(),
                commits: vec![CommitNotice {
                    replica: ReplicaId(7),
                    hard_pin: true,
                    soft_pin: false,
                }],
                more: false,
            },
        ),
        message_seed(
            "Register",
            &Register {
                node: NodeId(5),
                name: "n".into(),
                addr: "127.0.0.1:1".into(),
                segments: vec![SegmentInfo {
                    id: SegmentId(1),
                    size: 1 << 20,
                    tier: Tier::Dram,
                }],
                inventory: vec![InventoryEntry {
                    replica: tag.replica,
                    key: tag.key.clone(),
                    segment: tag.segment,
                    offset: tag.offset,
                    len: tag.len,
                    checksum: tag.checksum,
                    commit: CommitState::Committed {
                        hard_pin: false,
                        soft_pin: true,
                    },
                }],
            },
        ),
        message_seed(
            "HandoffClaim",
            &HandoffClaim {
                transfer_id: "req-1".into(),
            },
        ),
    ];
    let header = FrameHeader::request(Opcode::PutStart as u8, 42, 17, 0).encode();
    let record = {
        use kvpool_store::nvme::layout::{encode_header, RecordHeader, HEADER_LEN};
        let key = b"block/0";
        let mut b = vec![0u8; HEADER_LEN + key.len()];
        let h = RecordHeader {
            replica: 7,
            key_len: key.len() as u32,
            value_len: 100,
            value_crc: 9,
        };
        encode_header(&h, key, &mut b);
        b
    };
    let config = toml::to_string(&kvpool_master::config::MasterConfig::default())
        .expect("the default config serializes");
    let store = toml::to_string(&kvpool_store::config::StoreConfig::default())
        .expect("the default store config serializes");
    let store_nvme = "master = \"10.0.0.1:50051\"\ndram = \"1GiB\"\netcd = [\"http://e:2379\"]\n\
                      [nvme]\npath = \"/var/lib/kvpool/nvme.dat\"\nsize = \"64GiB\"\n";
    let namespace =
        r#"{"model":"m","kv_dtype":"bf16","layout":"vllm-nhd/all","block_size":16,"tp_size":2}"#;
    // role kv_producer, dp 0, tp 4, rank 3, every variable set.
    let mut pd_env = vec![0u8, 1, 0, 4, 3, 0, 0xff];
    pd_env.extend_from_slice(b"9000\x008998\x00480\x0090s\x0060\x0010.0.0.1\x00secret");
    let pd_handoff = {
        let hasher = kvpool_connector::BlockHasher::new(kvpool_connector::Namespace {
            model: "m".into(),
            kv_dtype: "bf16".into(),
            layout: "vllm-nhd/all".into(),
            block_size: 4,
            tp_rank: 0,
            tp_size: 1,
            pp_rank: 0,
            pp_size: 1,
        });
        let params = kvpool_connector::pd::HandoffParams {
            transfer_id: "t-1".into(),
            bootstrap_addr: "10.0.0.1:8998".into(),
            block_keys: hasher
                .keys(&[1, 2, 3, 4, 5, 6, 7, 8])
                .iter()
                .map(|k| k.to_param())
                .collect(),
        };
        let mut b = vec![1u8];
        b.extend(serde_json::to_vec(&params).unwrap());
        b
    };
    let seeds: Vec<(&str, String, Vec<u8>)> = messages
        .into_iter()
        .map(|(n, b)| ("messages", n, b))
        .chain([
            ("frame_header", "seed-request".to_string(), header.to_vec()),
            (
                "master_config",
                "seed-default".to_string(),
                config.into_bytes(),
            ),
            (
                "nvme_record_header",
                "seed-record".to_string(),
                record.clone(),
            ),
            (
                "store_config",
                "seed-default".to_string(),
                store.clone().into_bytes(),
            ),
            (
                "store_config",
                "seed-nvme".to_string(),
                store_nvme.as_bytes().to_vec(),
            ),
            (
                "proxy_namespace",
                "seed-vllm".to_string(),
                namespace.as_bytes().to_vec(),
            ),
            ("pd_params", "seed-env".to_string(), pd_env.clone()),
            ("pd_params", "seed-handoff".to_string(), pd_handoff.clone()),
        ])
        .collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let write = std::env::var_os("KVPOOL_FUZZ_WRITE_SEEDS").is_some();
    for (target, name, bytes) in &seeds {
        let check = TARGETS.iter().find(|(t, _)| t == target).unwrap().1;
        check(bytes);
        if write {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    // Seeds are accepted inputs, not just harmless ones.
    assert!(decode_body::<Register>(&seeds[7].2[1..]).is_ok());
    assert!(FrameHeader::decode(&header, &FrameLimits::default()).is_ok());
    assert!(kvpool_store::nvme::layout::decode_header(&record).is_ok());
    assert!(toml::from_str::<kvpool_store::config::StoreConfig>(store_nvme).is_ok());
    assert!(kvpool_proxy::KeyNamespace::parse(namespace).is_ok());
    let env = |k: &str| match k {
        "KVPOOL_BOOTSTRAP_PORT" => Some("9000".to_string()),
        "KVPOOL_CONSUMER_TIMEOUT" => Some("90s".to_string()),
        _ => None,
    };
    let pd = kvpool_connector::pd::PdConfig::from_lookup(
        kvpool_connector::pd::Role::Producer,
        0,
        4,
        3,
        env,
    );
    assert_eq!(pd.unwrap().bootstrap_port().unwrap(), 9003);
    let params: kvpool_connector::pd::HandoffParams =
        serde_json::from_slice(&pd_handoff[1..]).unwrap();
    assert_eq!(params.keys().unwrap().len(), 2);
}
