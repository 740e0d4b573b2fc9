//! The data path end to end: `kvpool up` as a real process, clients in this process over
//! loopback TCP, every byte compared.

use std::sync::Arc;

use kvpool_client::TransportMode;
use kvpool_client::{ClientError, ErrorCode};
use kvpool_proto::PutOptions;
use kvpool_tests::{client, client_over, loopback_rx_bytes, transport_matrix, up, value};

transport_matrix!(
    put_from_one_client_get_from_another_1b_to_64mib,
    one_client_puts_another_gets
);

async fn one_client_puts_another_gets(transport: TransportMode) {
    let pool = up("512MiB", &[]);
    let writer = client_over(&pool.addr("master"), transport);
    let reader = client_over(&pool.addr("master"), transport);
    let mut sizes = vec![
        1usize,
        2,
        63,
        4096,
        4097,
        65_536,
        1 << 20,
        (1 << 20) + 7,
        16 << 20,
        64 << 20,
    ];
    for i in 0..8u64 {
        // Random sizes across the range, reproducible from the seed in the failure message.
        let seed = rand::random::<u64>();
        let len = 1 + (seed % (8 << 20)) as usize;
        eprintln!("size case {i}: seed {seed} len {len}");
        sizes.push(len);
    }
    for (i, len) in sizes.iter().enumerate() {
        let key = format!("obj/{i}/{len}");
        let v = value(i as u64, *len);
        writer
            .put(key.as_bytes(), &v, &PutOptions::default())
            .await
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
        let got = reader
            .get(key.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("get {key}: {e}"));
        assert!(got.as_deref() == Some(&v[..]), "{key}: bytes differ");
        // And straight into a caller buffer, larger than the value.
        let mut buf = vec![0u8; len + 100];
        let n = reader.get_into(key.as_bytes(), &mut buf).await.unwrap();
        assert_eq!(n, Some(*len as u64));
        assert!(buf[..*len] == v[..], "{key}: get_into bytes differ");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_report_per_key_hits_and_misses() {
    let pool = up("64MiB", &[]);
    let c = client(&pool.addr("master"));
    let keys: Vec<String> = (0..200).map(|i| format!("batch/{i}")).collect();
    let vals: Vec<Vec<u8>> = (0..200).map(|i| value(i, 100 + i as usize * 37)).collect();
    // Put the even keys only.
    let items: Vec<(&[u8], &[u8])> = keys
        .iter()
        .zip(&vals)
        .step_by(2)
        .map(|(k, v)| (k.as_bytes(), v.as_slice()))
        .collect();
    for r in c.put_batch(&items, &PutOptions::default()).await {
        r.unwrap();
    }
    let all: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
    let got = c.get_batch(&all).await;
    assert_eq!(got.len(), 200);
    for (i, r) in got.into_iter().enumerate() {
        let r = r.unwrap_or_else(|e| panic!("key {i}: {e}"));
        if i % 2 == 0 {
            assert!(r.as_deref() == Some(&vals[i][..]), "key {i} differs");
        } else {
            assert!(r.is_none(), "key {i} should be a miss");
        }
    }
    let exists = c.exists(&all, false).await;
    for (i, e) in exists.into_iter().enumerate() {
        assert_eq!(e.unwrap(), i % 2 == 0, "exists {i}");
    }
    // Putting the batch again: every key already exists.
    for r in c.put_batch(&items, &PutOptions::default()).await {
        assert_eq!(r.unwrap_err().code(), ErrorCode::AlreadyExists);
    }
    // Remove a few, with one missing key in the batch.
    // The gets above leased these keys: remove refuses until forced.
    let rm = c.remove(&[b"batch/0"], false).await;
    assert_eq!(rm[0].as_ref().unwrap_err().code(), ErrorCode::HasLease);
    let rm = c.remove(&[b"batch/0", b"batch/1", b"batch/2"], true).await;
    assert!(rm[0].is_ok() && rm[2].is_ok());
    assert_eq!(rm[1].as_ref().unwrap_err().code(), ErrorCode::NotFound);
    assert!(c.get(b"batch/0").await.unwrap().is_none());
    // Gather on put, scatter on get: three layers in, two buffers out.
    let layers = [value(7, 1000), value(8, 5000), value(9, 3)];
    let parts: Vec<&[u8]> = layers.iter().map(|l| l.as_slice()).collect();
    c.put_parts(b"layers", &parts, &PutOptions::default())
        .await
        .unwrap();
    let (mut a, mut b) = (vec![0u8; 4000], vec![0u8; 4000]);
    let n = c
        .get_into_parts(b"layers", &mut [&mut a, &mut b])
        .await
        .unwrap();
    assert_eq!(n, Some(6003));
    let joined: Vec<u8> = layers.concat();
    assert!(a[..] == joined[..4000] && b[..2003] == joined[4000..]);
    // A buffer too small is refused, not truncated.
    let mut small = vec![0u8; 10];
    assert!(matches!(
        c.get_into(b"layers", &mut small).await,
        Err(ClientError::BufferTooSmall { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_of_one_key_exactly_one_wins() {
    let pool = up("64MiB", &[]);
    let master = pool.addr("master");
    for round in 0..5 {
        let key = format!("contended/{round}");
        let mut tasks = Vec::new();
        for w in 0..8u64 {
            let c = client(&master);
            let key = key.clone();
            tasks.push(tokio::spawn(async move {
                let v = value(w, 256 << 10);
                (w, c.put(key.as_bytes(), &v, &PutOptions::default()).await)
            }));
        }
        let mut winners = Vec::new();
        for t in tasks {
            let (w, r) = t.await.unwrap();
            match r {
                Ok(()) => winners.push(w),
                Err(e) => assert!(
                    matches!(e.code(), ErrorCode::AlreadyExists | ErrorCode::Processing),
                    "loser {w} failed with {e}"
                ),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let got = client(&master).get(key.as_bytes()).await.unwrap().unwrap();
        assert!(
            got == value(winners[0], 256 << 10),
            "round {round}: stored value is not the winner's"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_keeps_the_pool_accepting_and_spares_leased_and_pinned() {
    // 64 MiB of DRAM; 1 MiB objects; 4x the capacity written.
    let pool = up("64MiB", &[]);
    let c = Arc::new(client(&pool.addr("master")));
    let len = 1 << 20;
    c.put(
        b"pinned",
        &value(1, len),
        &PutOptions {
            hard_pin: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    c.put(b"leased", &value(2, len), &PutOptions::default())
        .await
        .unwrap();
    // A lease (10 s by default) protects it while the pool fills.
    assert_eq!(
        c.exists(&[b"leased"], true).await[0].as_ref().unwrap(),
        &true
    );
    let n = 256u64;
    for i in 0..n {
        let key = format!("fill/{i}");
        c.put(key.as_bytes(), &value(100 + i, len), &PutOptions::default())
            .await
            .unwrap_or_else(|e| panic!("put {key} into a full pool: {e}"));
        if i == 100 {
            // Renew the lease well inside its TTL.
            c.exists(&[b"leased"], true).await[0].as_ref().unwrap();
        }
    }
    let status = c.status().await.unwrap();
    assert!(status.evictions > 0, "nothing was evicted");
    let seg = &status.nodes[0].segments[0];
    assert!(seg.used <= seg.capacity);
    assert_eq!(
        c.get(b"pinned").await.unwrap().as_deref(),
        Some(&value(1, len)[..])
    );
    assert_eq!(
        c.get(b"leased").await.unwrap().as_deref(),
        Some(&value(2, len)[..])
    );
    // Every fill object is either its exact bytes or a miss; the newest ones are present.
    let keys: Vec<String> = (0..n).map(|i| format!("fill/{i}")).collect();
    let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
    let got = c.get_batch(&refs).await;
    let mut present = 0;
    for (i, r) in got.into_iter().enumerate() {
        if let Some(v) = r.unwrap() {
            assert!(v == value(100 + i as u64, len), "fill/{i}: wrong bytes");
            present += 1;
        }
    }
    assert!(
        present >= 40,
        "only {present} objects left in a 64 MiB pool"
    );
    assert!(present < n as usize, "nothing was evicted");
    let newest = c.get(format!("fill/{}", n - 1).as_bytes()).await.unwrap();
    assert!(newest.is_some(), "the newest object was evicted first");
    // The coldest went first: the first fill objects are gone.
    assert!(c.get(b"fill/0").await.unwrap().is_none());
}

/// Cuts `buf` into consecutive pieces whose lengths cycle through `shape` (the last piece
/// takes what is left).
fn scatter<'a>(mut buf: &'a mut [u8], shape: &[usize]) -> Vec<&'a mut [u8]> {
    let mut out = Vec::new();
    for &n in shape.iter().cycle() {
        if buf.is_empty() {
            break;
        }
        let (piece, rest) = buf.split_at_mut(n.min(buf.len()));
        out.push(piece);
        buf = rest;
    }
    out
}

transport_matrix!(
    many_small_parts_in_one_shape_come_back_in_another,
    parts_in_one_shape_come_back_in_another
);

async fn parts_in_one_shape_come_back_in_another(transport: TransportMode) {
    let pool = up("256MiB", &[]);
    let master = pool.addr("master");
    // One wire op per stripe chunk, whatever the parts: odd part sizes (empty ones too) cut
    // across chunk boundaries, and a value over several stripes goes over several
    // connections. A writer with a small, odd stripe makes every value span many chunks.
    let mut small_stripe = kvpool_client::ClientConfig::with_master(&master);
    small_stripe.engine.stripe_size = 100_003;
    small_stripe.transport = transport;
    let writers = [
        client_over(&master, transport),
        kvpool_client::Client::new(small_stripe),
    ];
    let reader = client_over(&master, transport);
    let put_shape = [1usize, 4095, 0, 32 << 10, 700, 65_537, 3];
    let get_shape = [13usize, 8191, 50_000, 1, 32 << 10];
    // A value of 64 KiB + 1 B parts spanning three 4 MiB stripes, a paged-like value of
    // 64 x 32 KiB, and odd sizes from 1 byte up.
    let lens = [
        1usize,
        4095,
        32 << 10,
        2 << 20,
        9 * (65_537) + 17,
        (12 << 20) + 5,
    ];
    for (w, writer) in writers.iter().enumerate() {
        let keys: Vec<String> = lens.iter().map(|n| format!("parts/{w}/{n}")).collect();
        let vals: Vec<Vec<u8>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| value(1000 * w as u64 + i as u64, n))
            .collect();
        let parts: Vec<Vec<&[u8]>> = vals
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let shape: &[usize] = match i {
                    3 => &[32 << 10],
                    5 => &[65_537],
                    _ => &put_shape,
                };
                let mut rest = v.as_slice();
                let mut out = Vec::new();
                for &n in shape.iter().cycle() {
                    if rest.is_empty() {
                        break;
                    }
                    let (p, r) = rest.split_at(n.min(rest.len()));
                    out.push(p);
                    rest = r;
                }
                out
            })
            .collect();
        let items: Vec<(&[u8], &[&[u8]])> = keys
            .iter()
            .zip(&parts)
            .map(|(k, p)| (k.as_bytes(), p.as_slice()))
            .collect();
        for (r, k) in writer
            .put_batch_parts(&items, &PutOptions::default())
            .await
            .into_iter()
            .zip(&keys)
        {
            r.unwrap_or_else(|e| panic!("put {k}: {e}"));
        }

        // Into a different scatter shape, with room to spare at the end.
        let mut bufs: Vec<Vec<u8>> = lens.iter().map(|&n| vec![0xAAu8; n + 17]).collect();
        let mut pieces: Vec<Vec<&mut [u8]>> =
            bufs.iter_mut().map(|b| scatter(b, &get_shape)).collect();
        let mut dests: Vec<&mut [&mut [u8]]> =
            pieces.iter_mut().map(|p| p.as_mut_slice()).collect();
        let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
        let got = reader.get_batch_into_parts(&refs, &mut dests).await;
        drop(dests);
        drop(pieces);
        for (i, r) in got.into_iter().enumerate() {
            let n = r.unwrap_or_else(|e| panic!("get {}: {e}", keys[i]));
            assert_eq!(n, Some(lens[i] as u64), "{}", keys[i]);
            assert!(
                bufs[i][..lens[i]] == vals[i][..],
                "{}: bytes differ",
                keys[i]
            );
            assert!(
                bufs[i][lens[i]..].iter().all(|&b| b == 0xAA),
                "{}: written past the value",
                keys[i]
            );
        }
        // And into one contiguous buffer each, through the small-stripe client too.
        for c in [&reader, &writers[1]] {
            for (v, r) in vals.iter().zip(c.get_batch(&refs).await) {
                assert!(r.unwrap().as_deref() == Some(&v[..]), "get_batch differs");
            }
        }
    }
}

/// A same-host get moves no payload over loopback TCP: the `lo` interface receives far less
/// than the value (only the small control and `ShmCommit` frames). Other processes may use
/// loopback meanwhile, which only adds bytes, so the least of a few tries is what counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_host_get_moves_no_payload_over_loopback() {
    let pool = up("256MiB", &[]);
    let master = pool.addr("master");
    let len = 64 << 20;
    let v = value(64, len);
    let shm = client(&master);
    shm.put(b"big", &v, &PutOptions::default()).await.unwrap();
    let mut buf = vec![0u8; len];
    // Attach first: the one-time handshake is not what is measured.
    assert_eq!(
        shm.get_into(b"big", &mut buf).await.unwrap(),
        Some(len as u64)
    );
    let mut least = u64::MAX;
    for _ in 0..3 {
        buf.fill(0);
        let before = loopback_rx_bytes();
        assert_eq!(
            shm.get_into(b"big", &mut buf).await.unwrap(),
            Some(len as u64)
        );
        least = least.min(loopback_rx_bytes() - before);
    }
    assert!(buf == v, "bytes differ");
    assert!(
        least < (len as u64) / 10,
        "a 64 MiB shared-memory get moved {least} bytes over lo"
    );
    // The same get over TCP does move the payload through lo (the counter works).
    let tcp = client_over(&master, TransportMode::Tcp);
    let before = loopback_rx_bytes();
    assert_eq!(
        tcp.get_into(b"big", &mut buf).await.unwrap(),
        Some(len as u64)
    );
    assert!(
        loopback_rx_bytes() - before >= len as u64,
        "TCP get not seen on lo"
    );
}
