//! Counts over the object table for operators (`/metrics`): how many objects are leased and
//! pinned right now. A scan, not counters kept by every rule: leases end by time passing, not
//! by an event a counter could see, and a scan every scrape (seconds apart) costs about
//! 20 ns per object under the lock, nothing on the request path.

use std::time::Duration;

use super::MasterCore;

/// Objects by the protections they hold at one instant (an object may count in several).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ObjectStats {
    /// Committed objects with a live read lease (eviction and remove skip them).
    pub leased: u64,
    /// Committed objects with a soft pin that has not expired.
    pub soft_pinned: u64,
    /// Committed objects with a hard pin (never evicted).
    pub hard_pinned: u64,
}

impl MasterCore {
    pub fn object_stats(&self, now: Duration) -> ObjectStats {
        let mut s = ObjectStats::default();
        for (_, o) in self.objects.iter().filter(|(_, o)| o.is_complete()) {
            s.leased += u64::from(o.leased(now));
            s.soft_pinned += u64::from(o.soft_pin && o.soft_pinned(now));
            s.hard_pinned += u64::from(o.hard_pin);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{hard_pinned, secs, soft_pinned, World, MIB};
    use super::*;

    #[test]
    fn counts_leases_and_pins_as_they_are_now() {
        let mut w = World::new();
        w.node(1, &[(10, 64 * MIB)]);
        w.put("plain", MIB);
        w.put_with("soft", MIB, soft_pinned());
        w.put_with("hard", MIB, hard_pinned());
        w.get("plain").unwrap();
        let s = w.core.object_stats(w.now);
        assert_eq!(
            s,
            ObjectStats {
                leased: 1,
                soft_pinned: 1,
                hard_pinned: 1
            }
        );
        // Leases (10 s) and soft pins (30 min) end by time alone.
        let later = w.now + secs(31 * 60);
        assert_eq!(
            w.core.object_stats(later),
            ObjectStats {
                leased: 0,
                soft_pinned: 0,
                hard_pinned: 1
            }
        );
    }
}
