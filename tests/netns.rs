//! A multi-host cluster on one machine: etcd, two masters, three storage nodes and two client
//! hosts, each in its own network namespace with its own address, joined by veth pairs to a
//! bridge that lives in a namespace of its own. Nothing is added to the root namespace: every
//! link and address is inside a namespace this test creates, and a drop guard deletes them
//! all (also on panic). Needs root and iproute2; reports itself skipped
//! (`kvpool_tests::skipped`, listed in `scripts/test.sh`'s summary) otherwise.
//!
//! The test's own client code runs on threads that `setns(2)` into a client host's
//! namespace, so its sockets live there. Every wait is a deadline poll.

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use kvpool_client::Client;
use kvpool_proto::PutOptions;
use kvpool_tests::{
    alive_nodes, etcd_bin, etcd_client_over, etcd_wait_healthy, kvpool_bin, leaders, probe,
    the_leader, value, wait_until, Proc,
};
use kvpool_transport::rpc::RpcClient;

/// A client of a simulated client host. The namespaces share one kernel (and one host
/// name), so a client would find the nodes "on its own host" and use shared memory; the
/// hosts here stand for separate machines, so their bytes must cross the network: TCP.
fn host_client(url: &str) -> Client {
    etcd_client_over(url, kvpool_client::TransportMode::Tcp)
}

/// The test network, 10.231.1.0/24 on a bridge private to this run.
const NET: &str = "10.231.1";

/// Host names and their last address octet.
const HOSTS: &[(&str, u8)] = &[
    ("e", 2),
    ("m1", 21),
    ("m2", 22),
    ("s1", 31),
    ("s2", 32),
    ("s3", 33),
    ("c1", 11),
    ("c2", 12),
];

fn ip_ok(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces of one run; dropping it deletes them, and with them every veth and the
/// bridge (all of which live inside them).
struct Net {
    prefix: String,
    made: Vec<String>,
}

impl Net {
    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    fn addr(host: &str) -> String {
        let octet = HOSTS
            .iter()
            .find(|(h, _)| *h == host)
            .expect("known host")
            .1;
        format!("{NET}.{octet}")
    }

    fn add_ns(&mut self, name: &str) -> bool {
        if !ip_ok(&["netns", "add", name]) {
            return false;
        }
        self.made.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"]);
        true
    }

    /// Builds the network, or returns why it cannot be built here.
    fn create() -> Result<Net, String> {
        // SAFETY: geteuid(2) has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err("network namespaces need root".into());
        }
        if !ip_ok(&["-V"]) {
            return Err("no `ip` (iproute2) on the PATH".into());
        }
        let mut net = Net {
            prefix: format!("kvp-{}", std::process::id()),
            made: Vec::new(),
        };
        let br = net.ns("br");
        if !net.add_ns(&br) {
            return Err(format!("`ip netns add {br}` failed"));
        }
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &br, "link", "set", "br0", "up"]);
        for (host, _) in HOSTS {
            let ns = net.ns(host);
            assert!(net.add_ns(&ns), "ip netns add {ns}");
            let port = format!("v-{host}");
            ip(&[
                "-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ]);
            ip(&["-n", &br, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &br, "link", "set", &port, "up"]);
            let cidr = format!("{}/24", Net::addr(host));
            ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        }
        Ok(net)
    }

    /// `ip netns exec NS kvpool ARGS...`, waiting for its ready line.
    fn kvpool(&self, host: &str, args: &[&str]) -> Proc {
        let bin = kvpool_bin();
        let ns = self.ns(host);
        let mut full = vec!["netns", "exec", &ns, bin.to_str().expect("utf-8 path")];
        full.extend_from_slice(args);
        Proc::start_program(std::path::Path::new("ip"), &full)
    }

    /// Runs `f` on a thread inside `host`'s namespace (its sockets are that host's).
    fn on<T: Send>(&self, host: &str, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.ns(host));
        std::thread::scope(|s| {
            let h = s.spawn(move || {
                let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                // SAFETY: setns(2) with a namespace fd we own; it changes only this thread's
                // network namespace, which ends with the thread.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            });
            h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Runs the future made by `f` on a runtime inside `host`'s namespace.
    fn run<T: Send, F: std::future::Future<Output = T>>(
        &self,
        host: &str,
        f: impl FnOnce() -> F + Send,
    ) -> T {
        self.on(host, || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(f())
        })
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.made.iter().rev() {
            let _ = ip_ok(&["netns", "del", ns]);
        }
    }
}

/// etcd inside a namespace; killed (and its folder removed) when dropped.
struct NsEtcd {
    child: Child,
    url: String,
    dir: PathBuf,
}

impl NsEtcd {
    fn start(net: &Net, host: &str) -> NsEtcd {
        let dir = std::env::temp_dir().join(format!(
            "kvpool-netns-etcd-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("etcd dir");
        let a = Net::addr(host);
        let (url, peer) = (format!("http://{a}:2379"), format!("http://{a}:2380"));
        let log = File::create(dir.join("etcd.log")).expect("etcd log");
        let child = Command::new("ip")
            .args(["netns", "exec", &net.ns(host)])
            .arg(etcd_bin())
            .args(["--name", "t", "--data-dir"])
            .arg(dir.join("data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        NsEtcd { child, url, dir }
    }
}

impl Drop for NsEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Probes of the masters at `addrs`, made on the calling thread (inside its namespace).
fn probes(addrs: &[String]) -> Vec<RpcClient> {
    addrs.iter().map(|a| probe(a)).collect()
}

const OBJECTS: u64 = 48;

fn val(i: u64) -> Vec<u8> {
    value(7_000 + i, (16 << 10) + (i as usize % 8) * 4096)
}

fn key(i: u64) -> Vec<u8> {
    format!("netns/{i}").into_bytes()
}

/// Gets every object once: panics on wrong bytes, returns how many came back correct.
async fn correct(c: &Client, phase: &str) -> u64 {
    let mut ok = 0;
    for i in 0..OBJECTS {
        if let Ok(Some(v)) = c.get(&key(i)).await {
            assert!(
                v == val(i),
                "{phase}: {:?} came back with wrong bytes",
                key(i)
            );
            ok += 1;
        }
    }
    ok
}

#[test]
fn two_masters_three_stores_each_on_its_own_host() {
    let started = Instant::now();
    let net = match Net::create() {
        Ok(n) => n,
        Err(why) => {
            kvpool_tests::skipped("netns two_masters_three_stores_each_on_its_own_host", &why);
            return;
        }
    };
    let etcd = NsEtcd::start(&net, "e");
    let url = etcd.url.clone();
    net.on("c1", || etcd_wait_healthy(&url, &etcd.dir.join("etcd.log")));

    let master_addrs: Vec<String> = ["m1", "m2"]
        .iter()
        .map(|h| format!("{}:7000", Net::addr(h)))
        .collect();
    let mut masters: Vec<Proc> = ["m1", "m2"]
        .iter()
        .zip(&master_addrs)
        .map(|(h, a)| net.kvpool(h, &["master", "--listen", a, "--etcd", &url]))
        .collect();
    let leader = net.run("c1", || async {
        the_leader(&probes(&master_addrs), Duration::from_secs(20)).await
    });

    let mut stores: Vec<Proc> = ["s1", "s2", "s3"]
        .iter()
        .map(|h| {
            let listen = format!("{}:7100", Net::addr(h));
            net.kvpool(
                h,
                &[
                    "store", "--listen", &listen, "--etcd", &url, "--dram", "64MiB", "--name", h,
                ],
            )
        })
        .collect();

    // Host c1 writes every object with two replicas.
    net.run("c1", || async {
        let c = host_client(&url);
        wait_until("3 nodes registered", Duration::from_secs(20), || async {
            alive_nodes(&c).await == 3
        })
        .await;
        let two = PutOptions {
            replicas: 2,
            ..Default::default()
        };
        for i in 0..OBJECTS {
            c.put(&key(i), &val(i), &two)
                .await
                .unwrap_or_else(|e| panic!("put {:?} from c1: {e}", key(i)));
        }
        assert_eq!(
            leaders(&probes(&master_addrs)).await,
            vec![leader],
            "one leader"
        );
    });

    // Host c2 reads them back byte for byte.
    net.run("c2", || async {
        let c = host_client(&url);
        assert_eq!(correct(&c, "from c2").await, OBJECTS, "all objects from c2");
    });

    // A storage node dies: every object still comes from its other replica.
    stores[0].kill();
    net.run("c2", || async {
        let c = host_client(&url);
        assert_eq!(
            correct(&c, "s1 killed").await,
            OBJECTS,
            "all objects after s1 was killed"
        );
    });

    // The leader dies: the standby leads within 10 s and the objects are gettable.
    masters[leader].kill();
    let killed = Instant::now();
    let standby = 1 - leader;
    net.run("c1", || async {
        let only = probes(std::slice::from_ref(&master_addrs[standby]));
        the_leader(&only, Duration::from_secs(10)).await;
        let took = killed.elapsed();
        assert!(took < Duration::from_secs(10), "failover took {took:?}");
        eprintln!("the standby leads {took:?} after the leader was killed");
        let c = host_client(&url);
        let c = &c;
        wait_until(
            "every object gettable after the failover",
            Duration::from_secs(20),
            || async move {
                alive_nodes(c).await == 2 && correct(c, "after failover").await == OBJECTS
            },
        )
        .await;
    });
    net.run("c2", || async {
        let c = host_client(&url);
        assert_eq!(correct(&c, "c2 after failover").await, OBJECTS);
    });

    drop(stores);
    drop(masters);
    drop(etcd);
    drop(net);
    eprintln!("netns cluster test took {:?}", started.elapsed());
}
