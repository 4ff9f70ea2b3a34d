//! Forgetting cgroups that were removed: after the snapshot that exports a
//! gone cgroup for the last time, its `cg_stats` entry and every `pairs`
//! entry naming it (as victim or culprit) are deleted, so a host with cgroup
//! churn does not fill the maps and then count new cgroups as drops.

use crate::intf::{CULPRIT_IDLE, CULPRIT_UNKNOWN};
use crate::observer::Observer;
use crate::skel::types::pair_key;
use crate::snapshot::RawSnapshot;
use anyhow::Result;
use libbpf_rs::MapCore;
use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// How long a forgotten id stays remembered: a task of the cgroup still
/// exiting, or a wait that overlapped one of its stretches, can write an
/// entry for it after the deletion; such late entries are deleted unseen
/// rather than exported as a counter that restarted from zero.
const TOMBSTONE: Duration = Duration::from_secs(60);

/// The v2 hierarchy, to ask whether a cgroup id still names a directory.
pub struct CgroupFs(OwnedFd);

impl CgroupFs {
    /// None without a v2 mount (the ids the programs see are v2 ids; with
    /// no way to check them nothing is forgotten).
    pub fn open() -> Option<CgroupFs> {
        let root = crate::cgroup::mounts().v2?;
        let c = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()).ok()?;
        // SAFETY: a valid NUL-terminated path; the fd is owned below.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
        // SAFETY: fd was just opened and is owned by nobody else.
        (fd >= 0).then(|| CgroupFs(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// True only when the kernel says the id names nothing any more (a
    /// kernfs file handle is the 64-bit id, and ids are never reused);
    /// any other failure (no CAP_DAC_READ_SEARCH, ...) counts as alive.
    pub fn is_gone(&self, id: u64) -> bool {
        /// `struct file_handle` with kernfs's 8-byte handle (FILEID_KERNFS).
        #[repr(C)]
        struct Handle {
            bytes: u32,
            kind: i32,
            id: u64,
        }
        let mut h = Handle {
            bytes: 8,
            kind: 0xfe,
            id,
        };
        // SAFETY: h is a file_handle followed by its 8 handle bytes.
        let fd = unsafe {
            libc::open_by_handle_at(
                self.0.as_raw_fd(),
                &mut h as *mut Handle as *mut libc::file_handle,
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: fd was just opened here.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
            return false;
        }
        let e = std::io::Error::last_os_error().raw_os_error();
        matches!(e, Some(libc::ESTALE) | Some(libc::ENOENT))
    }
}

/// Ids forgotten recently (see [`TOMBSTONE`]).
#[derive(Default)]
pub struct Forgotten(HashMap<u64, Instant>);

fn is_cgroup(id: u64) -> bool {
    id != CULPRIT_IDLE && id != CULPRIT_UNKNOWN
}

impl Observer {
    /// Called once `snap` is read: late entries of ids already forgotten
    /// are deleted and left out of `snap`; cgroups found gone are kept in
    /// `snap` (their final export) and deleted from the maps.
    pub(crate) fn forget_dead_cgroups(&self, snap: &mut RawSnapshot) -> Result<()> {
        let Some(fs) = &self.cgroup_fs else {
            return Ok(());
        };
        let Ok(mut forgotten) = self.forgotten.lock() else {
            return Ok(());
        };
        forgotten.0.retain(|_, at| at.elapsed() < TOMBSTONE);
        let late: HashSet<u64> = forgotten.0.keys().copied().collect();
        self.delete_cgroups(snap, &late);
        snap.cgroups.retain(|id, _| !late.contains(id));
        snap.pairs
            .retain(|(v, c), _| !late.contains(v) && !late.contains(c));

        let ids: HashSet<u64> = (snap.cgroups.keys().copied())
            .chain(snap.pairs.keys().flat_map(|(v, c)| [*v, *c]))
            .filter(|id| is_cgroup(*id))
            .collect();
        let dead: HashSet<u64> = ids.into_iter().filter(|id| fs.is_gone(*id)).collect();
        self.delete_cgroups(snap, &dead);
        if let Ok(mut floor) = self.cpu_floor.lock() {
            floor.retain(|id, _| !dead.contains(id));
        }
        let now = Instant::now();
        forgotten.0.extend(dead.into_iter().map(|id| (id, now)));
        Ok(())
    }

    /// Delete the map entries of `ids` that `snap` holds.
    fn delete_cgroups(&self, snap: &RawSnapshot, ids: &HashSet<u64>) {
        if ids.is_empty() {
            return;
        }
        for id in snap.cgroups.keys().filter(|id| ids.contains(id)) {
            let _ = self.skel.maps.cg_stats.delete(&id.to_ne_bytes());
        }
        for (victim, culprit) in snap.pairs.keys() {
            if ids.contains(victim) || ids.contains(culprit) {
                let k = pair_key {
                    victim: *victim,
                    culprit: *culprit,
                };
                let _ = self.skel.maps.pairs.delete(crate::snapshot::as_bytes(&k));
            }
        }
    }
}

impl Observer {
    /// The cgroup ids `cg_stats` holds now (its entry count, for checks).
    pub fn cg_stats_ids(&self) -> Vec<u64> {
        (self.skel.maps.cg_stats.keys())
            .filter_map(|k| Some(u64::from_ne_bytes(k.get(..8)?.try_into().ok()?)))
            .collect()
    }
}
