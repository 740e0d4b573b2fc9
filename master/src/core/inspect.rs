//! `Inspect`: what the master knows of an object, for operators. Read-only: no lease is
//! granted and recency is untouched, so looking does not change what eviction does.

use std::time::Duration;

use kvpool_proto::{
    check_key, ErrorCode, Inspect, InspectResponse, ItemResult, ObjectDetail, ReplicaDetail,
};

use super::{
    key_error,
    objects::{RepState, State},
    MasterCore,
};

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl MasterCore {
    /// Each key's object as the master sees it (Processing ones too: an operator asking why a
    /// put is stuck should see it).
    pub fn inspect(&self, now: Duration, req: Inspect) -> InspectResponse {
        InspectResponse {
            items: req.keys.iter().map(|k| self.inspect_one(now, k)).collect(),
        }
    }

    fn inspect_one(&self, now: Duration, key: &[u8]) -> ItemResult<ObjectDetail> {
        check_key(key)?;
        let (_, obj) = self
            .objects
            .lookup(key)
            .ok_or_else(|| key_error(ErrorCode::NotFound, key, "not in the pool"))?;
        let replicas = obj
            .replicas
            .iter()
            .filter_map(|r| {
                let replica = self.describe(r, obj.key.len(), obj.len)?;
                let state = match r.state {
                    RepState::Ready => "ready",
                    RepState::Filling => "filling",
                    RepState::Leaving => "leaving",
                };
                Some(ReplicaDetail {
                    replica,
                    state: state.to_string(),
                })
            })
            .collect();
        Ok(ObjectDetail {
            len: obj.len,
            checksum: obj.checksum,
            state: match obj.state {
                State::Complete => "complete",
                State::Processing { .. } => "processing",
            }
            .to_string(),
            replicas,
            lease_left_ms: millis(obj.lease_until.saturating_sub(now)),
            soft_pin_left_ms: obj
                .soft_pin_until
                .filter(|_| obj.soft_pin)
                .map(|t| millis(t.saturating_sub(now))),
            hard_pin: obj.hard_pin,
            reads: obj.reads,
        })
    }
}

#[cfg(test)]
mod tests {
    use kvpool_proto::Inspect;

    use super::super::tests::{hard_pinned, secs, soft_pinned, World, A, MIB};
    use super::*;

    fn inspect(w: &World, key: &str) -> ItemResult<ObjectDetail> {
        w.core
            .inspect(
                w.now,
                Inspect {
                    keys: vec![key.as_bytes().to_vec()],
                },
            )
            .items
            .remove(0)
    }

    #[test]
    fn shows_replicas_leases_and_pins_without_taking_a_lease() {
        let mut w = World::new();
        w.node(1, &[(10, 64 * MIB)]);
        let replicas = w.put("k", MIB);
        let d = inspect(&w, "k").unwrap();
        assert_eq!((d.len, d.state.as_str(), d.reads), (MIB, "complete", 0));
        assert_eq!(d.lease_left_ms, 0, "inspecting took no lease");
        assert_eq!(d.replicas.len(), 1);
        assert_eq!(d.replicas[0].replica, replicas[0]);
        assert_eq!(d.replicas[0].state, "ready");
        assert_eq!((d.soft_pin_left_ms, d.hard_pin), (None, false));

        w.get("k").unwrap();
        w.now += secs(4);
        let d = inspect(&w, "k").unwrap();
        assert_eq!(d.reads, 1);
        assert_eq!(d.lease_left_ms, 6_000, "10 s lease, 4 s later");

        w.put_with("soft", MIB, soft_pinned());
        w.put_with("hard", MIB, hard_pinned());
        assert_eq!(
            inspect(&w, "soft").unwrap().soft_pin_left_ms,
            Some(30 * 60_000)
        );
        assert!(inspect(&w, "hard").unwrap().hard_pin);

        w.start_with(A, "half", MIB, Default::default()).unwrap();
        assert_eq!(inspect(&w, "half").unwrap().state, "processing");
        assert_eq!(inspect(&w, "nope").unwrap_err().code, ErrorCode::NotFound);
        assert_eq!(inspect(&w, "").unwrap_err().code, ErrorCode::KeyTooLong);
    }
}
