//! The deadline of a vCPU run: a watchdog that kicks the vCPU out of
//! `KVM_RUN` so no run outlives its limit.

use kvm_ioctls::VcpuFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

/// Kicks a vCPU out of `KVM_RUN`: sets `kvm_run.immediate_exit` (so a
/// `KVM_RUN` that has not started yet returns at once) and signals the vCPU
/// thread (so one that is running returns `EINTR`). Repeats until the vCPU
/// thread has noticed, which closes the race between the two.
pub struct Watchdog {
    immediate_exit: *mut u8,
    fired: AtomicBool,
}

// SAFETY: the pointer into kvm_run is only written (one volatile byte) while `guard` runs.
unsafe impl Sync for Watchdog {}

/// A real-time signal with an empty handler: its only job is to interrupt
/// `KVM_RUN`. Installed once per process without SA_RESTART.
fn kick_signal() -> libc::c_int {
    static INSTALL: Once = Once::new();
    let sig = libc::SIGRTMIN() + 4;
    INSTALL.call_once(|| {
        extern "C" fn noop(_: libc::c_int) {}
        // SAFETY: an empty handler is async-signal-safe; every sigaction field is valid.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = noop as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    });
    sig
}

/// Tells the watcher thread that the guarded call is over.
struct Finished<'a>(&'a (Mutex<bool>, Condvar));

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        let (lock, cv) = self.0;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }
}

impl Watchdog {
    /// A watchdog for `fd`; clears `kvm_run.immediate_exit` (set by a
    /// previous kick) so the next `KVM_RUN` enters the guest.
    ///
    /// ```no_run
    /// use livehost_kvm::{Kvm, Mode, Vm, Watchdog, layout};
    /// use std::time::Duration;
    /// let kvm = Kvm::open()?;
    /// let vm = Vm::new(&kvm, 0x10000)?;
    /// vm.memory().write(layout::REAL_CODE, &[0xeb, 0xfe])?; // jmp $
    /// let mut vcpu = vm.vcpu(&kvm, Mode::Real, layout::REAL_CODE)?;
    /// let fd = vcpu.fd();
    /// let watchdog = Watchdog::new(fd);
    /// let r = watchdog.guard(Duration::from_millis(50), || fd.run().map(|_| ()));
    /// assert!(r.is_err() && watchdog.fired());
    /// # Ok::<(), anyhow::Error>(())
    /// ```
    pub fn new(fd: &mut VcpuFd) -> Watchdog {
        fd.set_kvm_immediate_exit(0);
        let run = fd.get_kvm_run() as *mut kvm_bindings::kvm_run;
        // SAFETY: computing the address of a field of the live mapping.
        let immediate_exit = unsafe { std::ptr::addr_of_mut!((*run).immediate_exit) };
        Watchdog {
            immediate_exit,
            fired: AtomicBool::new(false),
        }
    }

    /// The deadline passed and the vCPU was kicked.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// Run `f` (which runs the vCPU, `KVM_RUN`) on this thread with a
    /// watchdog thread that kicks it after `limit`; see [`Watchdog::new`]
    /// for an example. The vCPU must outlive this call.
    pub fn guard<T>(&self, limit: Duration, f: impl FnOnce() -> T) -> T {
        let sig = kick_signal();
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let done = Arc::new((Mutex::new(false), Condvar::new()));
        std::thread::scope(|s| {
            let d = done.clone();
            s.spawn(move || self.watch(&d, crate::deadline(Instant::now(), limit), me, sig));
            // Dropped when `f` returns or unwinds: a panicking `f` must
            // still stop the watcher, or the scope would wait for it forever.
            let _finished = Finished(&done);
            f()
        })
    }

    fn watch(
        &self,
        done: &(Mutex<bool>, Condvar),
        deadline: Instant,
        vcpu_thread: libc::pthread_t,
        sig: libc::c_int,
    ) {
        let (lock, cv) = done;
        let mut finished = lock.lock().unwrap_or_else(|e| e.into_inner());
        while !*finished {
            let now = Instant::now();
            let wait = if now >= deadline {
                self.fired.store(true, Ordering::SeqCst);
                // SAFETY: kvm_run stays mapped until `f` returns, which waits for `finished`.
                unsafe { self.immediate_exit.write_volatile(1) };
                // SAFETY: `vcpu_thread` owns the scope, so it lives until we are joined.
                unsafe { libc::pthread_kill(vcpu_thread, sig) };
                Duration::from_millis(5)
            } else {
                deadline - now
            };
            finished = cv
                .wait_timeout(finished, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}
