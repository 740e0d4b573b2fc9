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
                    checksum: 9,
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
}
