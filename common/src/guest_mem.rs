//! Anonymous memory to back a small KVM guest, unmapped on drop.
//!
//! Shared by every crate that runs a throw-away guest (the accelerator
//! probe, test guests), so the one `mmap`/`munmap` pair lives here.

use anyhow::{Result, bail};

/// A private anonymous mapping. Registering it with a VM is the caller's
/// job; the caller must drop the VM before this.
pub struct GuestMem {
    ptr: *mut u8,
    len: usize,
}

impl GuestMem {
    /// Map `len` bytes, zeroed, readable and writable, not reserved in swap.
    pub fn new(len: usize) -> Result<Self> {
        // SAFETY: anonymous private mapping, no fd; failure is MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!(
                "cannot map {len} bytes of guest memory: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(GuestMem {
            ptr: ptr as *mut u8,
            len,
        })
    }

    /// Copy `bytes` to offset `at`; panics if it does not fit (a bug in the
    /// caller's guest layout, not a runtime condition).
    pub fn write(&mut self, at: usize, bytes: &[u8]) {
        assert!(
            at.checked_add(bytes.len())
                .is_some_and(|end| end <= self.len)
        );
        // SAFETY: bounds checked above; the mapping is ours and writable.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(at), bytes.len()) };
    }

    /// The host address, for `kvm_userspace_memory_region::userspace_addr`.
    pub fn host_addr(&self) -> u64 {
        self.ptr as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: ptr/len came from our own successful mmap.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_zeroed_and_writes() {
        let mut m = GuestMem::new(0x2000).unwrap();
        m.write(0x1ffe, &[1, 2]);
        // SAFETY: reading back inside our own mapping.
        let b = unsafe { std::slice::from_raw_parts(m.host_addr() as *const u8, m.len()) };
        assert_eq!(&b[0x1ffe..], &[1, 2]);
        assert!(b[..0x1ffe].iter().all(|&x| x == 0));
    }

    #[test]
    #[should_panic]
    fn out_of_bounds_write_is_caught() {
        GuestMem::new(16).unwrap().write(15, &[0, 0]);
    }
}
