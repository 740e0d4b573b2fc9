use proptest::prelude::*;

use super::*;

/// A streamed read's op status: two bytes, little-endian, 0 for success; any two bytes
/// decode, and a code this build does not know is never read as success.
#[test]
fn read_status_bytes_are_pinned() {
    assert_eq!(ReadStatus(ErrorCode::Ok).encode(), [0, 0]);
    let nf = ReadStatus(ErrorCode::NotFound).encode();
    assert_eq!(u16::from_le_bytes(nf), ErrorCode::NotFound as u16);
    assert_eq!(ReadStatus::decode(nf), ReadStatus(ErrorCode::NotFound));
    assert_eq!(ReadStatus::decode([0xff, 0xfe]).0, ErrorCode::Unknown);
    assert_ne!(ErrorCode::Unknown, ErrorCode::Ok);
    assert_eq!(
        ReadStatus::payload_len([4096, 1 << 20]),
        4096 + (1 << 20) + 4
    );
    assert_eq!(
        ReadStatus::payload_len([u64::MAX, 1]),
        u64::MAX,
        "saturates"
    );
}

fn round_trip<T: Message + PartialEq + std::fmt::Debug>(m: &T) {
    let b = encode_body(m);
    assert_eq!(&decode_body::<T>(&b).unwrap(), m);
}

#[test]
fn messages_round_trip() {
    round_trip(&PutStart {
        client: ClientId(9),
        items: vec![PutStartItem {
            key: b"k".to_vec(),
            len: 5,
            options: PutOptions::default(),
        }],
    });
    round_trip(&Write {
        ops: vec![WriteOp {
            segment: SegmentId(1),
            offset: 2,
            len: 3,
        }],
        tags: vec![ObjectTag {
            replica: ReplicaId(4),
            key: vec![1, 2],
            segment: SegmentId(1),
            offset: 2,
            len: 3,
            checksum: 7,
        }],
    });
}

#[test]
fn golden_body() {
    // postcard: varint lengths and integers; pins the body encoding across releases.
    let b = encode_body(&Exists {
        keys: vec![b"ab".to_vec()],
        lease: true,
    });
    assert_eq!(b, vec![1, 2, b'a', b'b', 1]);
    let b = encode_body(&UnitResponse {
        items: vec![Ok(()), Err(WireError::new(ErrorCode::NotFound, "x"))],
    });
    assert_eq!(b, vec![2, 0, 1, 200, 1, 1, b'x']);
}

#[test]
fn hello_golden_bytes() {
    // Pinned: a Hello is what every client sends first, across versions.
    let hello = Hello {
        token: b"tok".to_vec(),
        client_version: 1,
    };
    let b = encode_body(&hello);
    assert_eq!(b, vec![3, b't', b'o', b'k', 1]);
    assert_eq!(decode_body::<Hello>(&b).unwrap(), hello);
    // client_version is a varint: 300 takes two bytes.
    let b = encode_body(&Hello {
        token: Vec::new(),
        client_version: 300,
    });
    assert_eq!(b, vec![0, 0xac, 0x02]);
    let b = encode_body(&HelloResponse { server_version: 1 });
    assert_eq!(b, vec![1]);
    assert_eq!(
        decode_body::<HelloResponse>(&b).unwrap(),
        HelloResponse { server_version: 1 }
    );
    assert_eq!(Opcode::try_from(0x01).unwrap(), Opcode::Hello);
    assert!(!format!("{hello:?}").contains("116, 111, 107"));
}

#[test]
fn remove_all_golden_bytes() {
    let b = encode_body(&RemoveAll {
        force: true,
        prefix: Some(b"t\0".to_vec()),
    });
    assert_eq!(b, vec![1, 1, 2, b't', 0]);
    let b = encode_body(&RemoveAll {
        force: false,
        prefix: None,
    });
    assert_eq!(b, vec![0, 0]);
}

#[test]
fn list_remove_regex_and_leave_golden_bytes() {
    let b = encode_body(&ListKeys {
        prefix: b"t\0".to_vec(),
        start_after: Some(b"a".to_vec()),
        limit: 300,
    });
    assert_eq!(b, vec![2, b't', 0, 1, 1, b'a', 0xac, 0x02]);
    let b = encode_body(&ListKeysResponse {
        keys: vec![b"a".to_vec(), b"bc".to_vec()],
        more: true,
    });
    assert_eq!(b, vec![2, 1, b'a', 2, b'b', b'c', 1]);
    let b = encode_body(&RemoveRegex {
        pattern: "^a".to_string(),
        prefix: None,
        force: true,
    });
    assert_eq!(b, vec![2, b'^', b'a', 0, 1]);
    assert_eq!(encode_body(&Leave { node: NodeId(300) }), vec![0xac, 0x02]);
}

#[test]
fn docs_list_every_opcode() {
    let doc = include_str!("../../../docs/protocol.md");
    for &o in Opcode::ALL {
        let row = format!("| 0x{:02x} | {o:?} |", o as u8);
        assert!(doc.contains(&row), "docs/protocol.md lacks the row `{row}`");
    }
}

#[test]
fn refuses_trailing_bytes() {
    let mut b = encode_body(&Remove {
        keys: vec![],
        force: false,
    });
    b.push(0);
    assert_eq!(
        decode_body::<Remove>(&b).unwrap_err().code,
        ErrorCode::MalformedBody
    );
}

#[test]
fn opcodes_are_unique() {
    for o in Opcode::ALL {
        assert_eq!(Opcode::try_from(*o as u8).unwrap(), *o);
    }
    assert_eq!(
        Opcode::try_from(0xEE).unwrap_err().code,
        ErrorCode::UnknownOpcode
    );
}

proptest! {
    // Every decoder, fed arbitrary bytes, returns a value or an error and never panics.
    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_body::<Hello>(&bytes);
        let _ = decode_body::<HelloResponse>(&bytes);
        let _ = decode_body::<PutStart>(&bytes);
        let _ = decode_body::<PutStartResponse>(&bytes);
        let _ = decode_body::<PutEnd>(&bytes);
        let _ = decode_body::<UnitResponse>(&bytes);
        let _ = decode_body::<GetReplicas>(&bytes);
        let _ = decode_body::<GetReplicasResponse>(&bytes);
        let _ = decode_body::<Exists>(&bytes);
        let _ = decode_body::<ExistsResponse>(&bytes);
        let _ = decode_body::<Remove>(&bytes);
        let _ = decode_body::<RemoveAll>(&bytes);
        let _ = decode_body::<RemoveAllResponse>(&bytes);
        let _ = decode_body::<StatusResponse>(&bytes);
        let _ = decode_body::<ListKeys>(&bytes);
        let _ = decode_body::<ListKeysResponse>(&bytes);
        let _ = decode_body::<RemoveRegex>(&bytes);
        let _ = decode_body::<MasterIndexResponse>(&bytes);
        let _ = decode_body::<Touch>(&bytes);
        let _ = decode_body::<Leave>(&bytes);
        let _ = decode_body::<Register>(&bytes);
        let _ = decode_body::<RegisterResponse>(&bytes);
        let _ = decode_body::<Heartbeat>(&bytes);
        let _ = decode_body::<HeartbeatResponse>(&bytes);
        let _ = decode_body::<Read>(&bytes);
        let _ = decode_body::<Write>(&bytes);
    }

    #[test]
    fn huge_declared_lengths_do_not_allocate(n in 1u64 << 40..u64::MAX >> 8) {
        // A varint length far beyond the body must fail, not reserve memory.
        let mut b = Vec::new();
        let mut v = n;
        while v >= 0x80 { b.push((v as u8) | 0x80); v >>= 7; }
        b.push(v as u8);
        prop_assert!(decode_body::<Read>(&b).is_err());
    }
}
