//! Bounded Prometheus cardinality on hosts with thousands of cgroups
//! (`serve --top N`): at most N cgroups get series of their own, every
//! other one is summed into one `cgroup="other"` series.
//!
//! Membership is decided once per cgroup, when it is first seen (the
//! busiest new ones first, while there is room), and never changes: a
//! cgroup moving between its own series and "other" would make both
//! counters jump, and "other" would go back. So "other" sums a set that only
//! grows, of counters that only grow: it never decreases. A folded cgroup
//! that leaves the snapshots (removed, then forgotten by the observer)
//! keeps its last values in "other", for the same reason.

use crate::intf::{CULPRIT_IDLE, CULPRIT_UNKNOWN};
use crate::snapshot::{CgVal, PairVal, RawSnapshot};
use std::collections::{HashMap, HashSet};

/// The cgroup id that stands for every cgroup without series of its own
/// (no real cgroup has it: ids are kernfs inode numbers).
pub const OTHER: u64 = u64::MAX - 1;

/// Which cgroups have series of their own, kept across scrapes.
#[derive(Debug, Default)]
pub struct TopCgroups {
    limit: usize,
    named: HashSet<u64>,
    folded: HashSet<u64>,
    /// The folded entries of the previous snapshot, by raw key.
    last_cgroups: HashMap<u64, CgVal>,
    last_pairs: HashMap<(u64, u64), PairVal>,
    /// Last values of folded entries gone since, by exported key.
    retired_cgroups: HashMap<u64, CgVal>,
    retired_pairs: HashMap<(u64, u64), PairVal>,
}

fn add_cg(o: &mut CgVal, v: &CgVal) {
    o.cpu_ns += v.cpu_ns;
    o.rq_count += v.rq_count;
    o.rq_sum_ns += v.rq_sum_ns;
    o.rq_max_ns = o.rq_max_ns.max(v.rq_max_ns);
    for (a, b) in o.hist.iter_mut().zip(v.hist.iter()) {
        *a += b;
    }
}

fn add_pair(o: &mut PairVal, v: &PairVal) {
    o.wait_count += v.wait_count;
    o.wait_ns += v.wait_ns;
    o.preemptions += v.preemptions;
}

impl TopCgroups {
    pub fn new(limit: usize) -> TopCgroups {
        TopCgroups {
            limit,
            ..Default::default()
        }
    }

    /// Give each cgroup not seen before its place, busiest first.
    fn assign(&mut self, snap: &RawSnapshot) {
        let mut new: Vec<(&u64, &CgVal)> = snap
            .cgroups
            .iter()
            .filter(|(id, _)| !self.named.contains(id) && !self.folded.contains(id))
            .collect();
        new.sort_by_key(|(id, v)| (std::cmp::Reverse(v.cpu_ns + v.rq_sum_ns), **id));
        for (id, _) in new {
            if self.named.len() < self.limit {
                self.named.insert(*id);
            } else {
                self.folded.insert(*id);
            }
        }
    }

    /// The id a cgroup is exported under.
    fn label_of(&self, id: u64) -> u64 {
        if self.folded.contains(&id) { OTHER } else { id }
    }

    /// `snap` with every folded cgroup summed into [`OTHER`], as victim and
    /// as culprit (idle and unknown culprits stay what they are).
    pub fn fold(&mut self, snap: &RawSnapshot) -> RawSnapshot {
        self.assign(snap);
        self.retire_gone(snap);
        let mut out = RawSnapshot {
            cgroups: self.retired_cgroups.clone(),
            pairs: self.retired_pairs.clone(),
            ..snap.clone()
        };
        for (id, v) in &snap.cgroups {
            let o = out.cgroups.entry(self.label_of(*id)).or_default();
            add_cg(o, v);
            o.rq_interval_max_ns = o.rq_interval_max_ns.max(v.rq_interval_max_ns);
        }
        for (key, v) in &snap.pairs {
            add_pair(out.pairs.entry(self.pair_label(*key)).or_default(), v);
        }
        out
    }

    /// The key a pair is exported under.
    fn pair_label(&self, (victim, culprit): (u64, u64)) -> (u64, u64) {
        let c = match culprit {
            CULPRIT_IDLE | CULPRIT_UNKNOWN => culprit,
            c => self.label_of(c),
        };
        (self.label_of(victim), c)
    }

    /// Folded entries of the previous snapshot missing from `snap` keep
    /// their last values in the sums; remember this snapshot's.
    fn retire_gone(&mut self, snap: &RawSnapshot) {
        for (id, v) in &self.last_cgroups {
            if !snap.cgroups.contains_key(id) {
                add_cg(
                    self.retired_cgroups.entry(self.label_of(*id)).or_default(),
                    v,
                );
            }
        }
        for (key, v) in &self.last_pairs {
            if !snap.pairs.contains_key(key) {
                let label = self.pair_label(*key);
                add_pair(self.retired_pairs.entry(label).or_default(), v);
            }
        }
        self.last_cgroups = (snap.cgroups.iter())
            .filter(|(id, _)| self.folded.contains(id))
            .map(|(id, v)| (*id, *v))
            .collect();
        self.last_pairs = (snap.pairs.iter())
            .filter(|(k, _)| self.pair_label(**k) != **k)
            .map(|(k, v)| (*k, *v))
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(cgroups: &[(u64, u64)], pairs: &[((u64, u64), u64)]) -> RawSnapshot {
        let mut s = RawSnapshot::default();
        for (id, cpu) in cgroups {
            let v = CgVal {
                cpu_ns: *cpu,
                ..Default::default()
            };
            s.cgroups.insert(*id, v);
        }
        for (k, ns) in pairs {
            let v = PairVal {
                wait_ns: *ns,
                ..Default::default()
            };
            s.pairs.insert(*k, v);
        }
        s
    }

    /// The busiest cgroups at first sight keep their series; the rest and
    /// every later one are summed into "other", which never decreases even
    /// when a busy cgroup appears late (it joins "other", it does not push
    /// a named one out).
    #[test]
    fn at_most_n_named_cgroups_and_other_never_decreases() {
        let mut top = TopCgroups::new(2);
        let s1 = snap(&[(10, 100), (11, 50), (12, 5)], &[((12, 10), 7)]);
        let f1 = top.fold(&s1);
        let mut ids: Vec<u64> = f1.cgroups.keys().copied().collect();
        ids.sort();
        assert_eq!(ids, [10, 11, OTHER]);
        assert_eq!(f1.cgroups[&OTHER].cpu_ns, 5);
        assert_eq!(f1.pairs[&(OTHER, 10)].wait_ns, 7);
        // 13 is new and busier than anyone: still "other" (no room left).
        let s2 = snap(
            &[(10, 120), (11, 60), (12, 6), (13, 1000)],
            &[((12, 13), 9)],
        );
        let f2 = top.fold(&s2);
        assert_eq!(f2.cgroups.len(), 3);
        assert_eq!(f2.cgroups[&OTHER].cpu_ns, 1006);
        assert!(f2.cgroups[&OTHER].cpu_ns >= f1.cgroups[&OTHER].cpu_ns);
        assert_eq!(f2.pairs[&(OTHER, OTHER)].wait_ns, 9);
        // Idle and unknown culprits are kept apart.
        let s3 = snap(
            &[(12, 6)],
            &[((12, CULPRIT_IDLE), 3), ((12, CULPRIT_UNKNOWN), 4)],
        );
        let f3 = top.fold(&s3);
        assert_eq!(f3.pairs[&(OTHER, CULPRIT_IDLE)].wait_ns, 3);
        assert_eq!(f3.pairs[&(OTHER, CULPRIT_UNKNOWN)].wait_ns, 4);
    }

    /// A folded cgroup that is forgotten (absent from later snapshots)
    /// leaves its last values in "other": the sum does not go back.
    #[test]
    fn other_keeps_the_counts_of_forgotten_cgroups() {
        let mut top = TopCgroups::new(1);
        let s1 = snap(&[(10, 100), (11, 50)], &[((11, 10), 7), ((10, 11), 2)]);
        let f1 = top.fold(&s1);
        assert_eq!(f1.cgroups[&OTHER].cpu_ns, 50);
        let s2 = snap(&[(10, 120)], &[]);
        let f2 = top.fold(&s2);
        assert_eq!(f2.cgroups[&OTHER].cpu_ns, 50);
        assert_eq!(f2.pairs[&(OTHER, 10)].wait_ns, 7);
        assert_eq!(f2.pairs[&(10, OTHER)].wait_ns, 2);
        assert_eq!(f2.cgroups[&10].cpu_ns, 120);
        let f3 = top.fold(&snap(&[(10, 130), (12, 5)], &[]));
        assert_eq!(f3.cgroups[&OTHER].cpu_ns, 55, "retired once, not again");
    }

    /// With room for everyone, nothing is folded.
    #[test]
    fn a_large_limit_changes_nothing() {
        let mut top = TopCgroups::new(100);
        let s = snap(&[(1, 1), (2, 2)], &[((1, 2), 3)]);
        let f = top.fold(&s);
        assert_eq!(f.cgroups.len(), 2);
        assert!(!f.cgroups.contains_key(&OTHER));
        assert_eq!(f.pairs[&(1, 2)].wait_ns, 3);
    }
}
