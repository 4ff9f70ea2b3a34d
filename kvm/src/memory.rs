//! Guest RAM: one anonymous mapping at guest-physical 0, through vm-memory.

use anyhow::{Result, anyhow};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// RAM for one guest: a single region at guest-physical address 0, zeroed,
/// unmapped on drop. [`Vm`](crate::Vm) owns it and drops it after the VM fd.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    len: usize,
}

impl GuestRam {
    /// Map `len` bytes of anonymous memory (`mmap`; no ioctl).
    ///
    /// ```
    /// let ram = livehost_kvm::GuestRam::new(0x2000)?;
    /// ram.write(0x1ffe, &[1, 2])?;
    /// assert_eq!(ram.read_u64(0x1000)?, 0);
    /// # Ok::<(), anyhow::Error>(())
    /// ```
    pub fn new(len: usize) -> Result<GuestRam> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)])
            .map_err(|e| anyhow!("cannot map {len} bytes of guest RAM: {e:?}"))?;
        Ok(GuestRam { mem, len })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The vm-memory object, for callers that want its full API.
    pub fn inner(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The host address of guest-physical 0, for
    /// `kvm_userspace_memory_region::userspace_addr` (no ioctl).
    ///
    /// ```
    /// let ram = livehost_kvm::GuestRam::new(0x1000)?;
    /// assert_ne!(ram.host_addr()?, 0);
    /// # Ok::<(), anyhow::Error>(())
    /// ```
    pub fn host_addr(&self) -> Result<u64> {
        self.mem
            .get_host_address(GuestAddress(0))
            .map(|p| p as u64)
            .map_err(|e| anyhow!("guest RAM has no host address: {e:?}"))
    }

    /// Copy `data` to guest-physical `addr`; an error if it does not fit.
    ///
    /// ```
    /// let ram = livehost_kvm::GuestRam::new(0x1000)?;
    /// assert!(ram.write(0xfff, &[0, 0]).is_err());
    /// # Ok::<(), anyhow::Error>(())
    /// ```
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        self.mem.write_slice(data, GuestAddress(addr)).map_err(|e| {
            anyhow!(
                "cannot write {} bytes at guest {addr:#x}: {e:?}",
                data.len()
            )
        })
    }

    /// Read the little-endian u64 at guest-physical `addr`.
    ///
    /// ```
    /// let ram = livehost_kvm::GuestRam::new(0x1000)?;
    /// ram.write(8, &7u64.to_le_bytes())?;
    /// assert_eq!(ram.read_u64(8)?, 7);
    /// # Ok::<(), anyhow::Error>(())
    /// ```
    pub fn read_u64(&self, addr: u64) -> Result<u64> {
        self.mem
            .read_obj::<u64>(GuestAddress(addr))
            .map_err(|e| anyhow!("cannot read guest {addr:#x}: {e:?}"))
    }

    /// Bytes of guest RAM resident in host memory (`mincore`), so that a
    /// runtime's own overhead can be told apart from the guest's RAM in its
    /// RSS. 0 when unknown.
    ///
    /// ```
    /// let ram = livehost_kvm::GuestRam::new(0x4000)?;
    /// ram.write(0, &[1])?; // touches one page
    /// assert!(ram.resident_bytes() >= 4096);
    /// # Ok::<(), anyhow::Error>(())
    /// ```
    pub fn resident_bytes(&self) -> u64 {
        let Ok(host) = self.host_addr() else {
            return 0;
        };
        let pages = self.len.div_ceil(4096);
        let mut vec = vec![0u8; pages];
        // SAFETY: our own mapping of `len` bytes, and one vector byte per page.
        let r = unsafe { libc::mincore(host as *mut libc::c_void, self.len, vec.as_mut_ptr()) };
        if r != 0 {
            return 0;
        }
        vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * 4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_zeroed_and_writes() {
        let m = GuestRam::new(0x2000).unwrap();
        m.write(0x1ff8, &[1, 2]).unwrap();
        assert_eq!(m.read_u64(0x1ff8).unwrap(), 0x0201);
        assert_eq!(m.read_u64(0x1000).unwrap(), 0);
        assert!(m.resident_bytes() <= 0x2000);
    }

    #[test]
    fn out_of_bounds_write_is_refused() {
        assert!(
            GuestRam::new(0x1000)
                .unwrap()
                .write(0xfff, &[0, 0])
                .is_err()
        );
    }
}
