//! kernel-tests: boot a real Debian kernel in QEMU and run commands in it.
//!
//! The build and CI machines cannot load kernel modules and their KVM cannot
//! boot Linux, so every livehost test that needs a real kernel (livepatch,
//! module BTF, nested KVM) runs through this crate:
//!
//! ```no_run
//! use kernel_tests::{RunOptions, GuestStatus};
//! let out = kernel_tests::run(&RunOptions::new(["uname", "-r"])).unwrap();
//! assert_eq!(out.status, GuestStatus::Exited(0));
//! println!("{}", out.stdout);
//! ```
//!
//! Pieces: [`kernel`] fetches and caches Debian kernels, [`initramfs`] is
//! the one newc cpio writer, [`rootfs`] fills it for a guest (busybox, init,
//! modules, the command), [`accel`] decides between KVM and TCG with the
//! KVM speed probe of `livehost-kvm`, [`qemu`] is the one QEMU launcher
//! (configuration struct to arguments), [`guest`] runs a guest and
//! its report is parsed in `frame`, [`module`] builds out-of-tree modules
//! against a guest kernel's headers, [`pvh`] turns a bzImage into the ELF
//! QEMU boots directly (faster under TCG).

pub mod accel;
pub mod commands;
mod frame;
pub mod guest;
pub mod initramfs;
pub mod kernel;
pub mod module;
pub mod pvh;
pub mod qemu;
pub mod rootfs;
mod run_dir;

pub use accel::AccelChoice;
pub use guest::{GuestStatus, RunOptions, RunOutcome, run};
pub use kernel::{GuestKernel, KernelSpec, fetch};
pub use qemu::{Accel, QemuConfig};
