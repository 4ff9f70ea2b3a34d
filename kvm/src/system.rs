//! `/dev/kvm`: the KVM system object.

use anyhow::{Context, Result, bail};
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};

/// `/dev/kvm`, opened once, with the reasons it may be unusable spelled out.
pub struct Kvm {
    kvm: kvm_ioctls::Kvm,
}

impl Kvm {
    /// Open `/dev/kvm` and check `KVM_GET_API_VERSION`. The error says which
    /// of the usual causes applies (missing device, no permission) and what
    /// to do.
    ///
    /// ```no_run
    /// let kvm = livehost_kvm::Kvm::open()?;
    /// # Ok::<(), anyhow::Error>(())
    /// ```
    pub fn open() -> Result<Kvm> {
        Self::open_path("/dev/kvm")
    }

    /// Open a KVM device node at `path` and check `KVM_GET_API_VERSION`
    /// (tests point this at files that are not KVM to check the error path).
    ///
    /// ```
    /// assert!(livehost_kvm::Kvm::open_path("/dev/null").is_err());
    /// ```
    pub fn open_path(path: &str) -> Result<Kvm> {
        let c = std::ffi::CString::new(path).context("device path contains NUL")?;
        let kvm = match kvm_ioctls::Kvm::new_with_path(&c) {
            Ok(k) => k,
            Err(e) => match e.errno() {
                libc::ENOENT => bail!(
                    "{path} does not exist: this host has no KVM (load kvm_intel/kvm_amd, enable \
                     virtualization in firmware, or for a nested host enable nested \
                     virtualization); the QEMU/TCG and container rows still run"
                ),
                libc::EACCES | libc::EPERM => bail!(
                    "no permission to open {path}: run as root or add your user to the group \
                     that owns it (usually `kvm`)"
                ),
                _ => return Err(e).with_context(|| format!("cannot open {path}")),
            },
        };
        let v = kvm.get_api_version();
        if v != 12 {
            bail!("{path} is not a usable KVM device (KVM_GET_API_VERSION returned {v}, want 12)");
        }
        Ok(Kvm { kvm })
    }

    /// The CPUID entries KVM can offer a guest (`KVM_GET_SUPPORTED_CPUID`).
    ///
    /// ```no_run
    /// let cpuid = livehost_kvm::Kvm::open()?.supported_cpuid()?;
    /// assert!(!cpuid.as_slice().is_empty());
    /// # Ok::<(), anyhow::Error>(())
    /// ```
    pub fn supported_cpuid(&self) -> Result<CpuId> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .context("KVM_GET_SUPPORTED_CPUID failed")
    }

    /// The kvm-ioctls object, for ioctls this crate does not wrap.
    pub fn inner(&self) -> &kvm_ioctls::Kvm {
        &self.kvm
    }
}
