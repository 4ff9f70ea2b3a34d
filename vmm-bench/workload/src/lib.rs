//! The workload every vmm-bench path runs.
//!
//! It is `no_std` and allocation-free so that exactly this code is linked
//! into the native binary, the container's static init, the unikernel and the
//! QEMU-Linux init: the paths differ only in what runs underneath, and every
//! path must return the same checksum for the same size and seed.
//!
//! The checksum fills a caller-provided buffer with a pseudo-random stream
//! and then reads it back, so it touches every byte twice: memory bandwidth
//! and page faults (or EPT/NPT faults in a guest) show up, which a pure
//! register loop would hide.
#![no_std]

/// Seed every path uses unless told otherwise.
pub const DEFAULT_SEED: u64 = 0x6c69_7665_686f_7374; // "livehost"

/// Bytes per MiB.
pub const MIB: usize = 1 << 20;

/// Largest workload size, in KiB, that every path accepts (1 GiB): the
/// command line refuses anything larger, our VMM and the QEMU runners check
/// it again, and the unikernel's PVH entry and the Linux init ignore or
/// refuse larger values themselves.
pub const MAX_KIB: u64 = 1 << 20;

/// Fill `buf` with the stream for `seed` and return the checksum of it.
///
/// The result depends only on `buf.len()` and `seed`, never on the buffer's
/// prior contents or address.
pub fn checksum(buf: &mut [u8], seed: u64) -> u64 {
    fill(buf, seed);
    digest(buf)
}

/// xorshift64* stream, 8 bytes per step; cheap enough that the read-back
/// pass is a real share of the work.
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        c.copy_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    for b in chunks.into_remainder() {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        *b = x.wrapping_mul(0x2545_f491_4f6c_dd1d) as u8;
    }
}

/// Order-sensitive digest (a multiply-rotate mix), so a swapped or
/// unwritten page changes the result.
fn digest(buf: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ buf.len() as u64;
    let mut chunks = buf.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h ^ u64::from_le_bytes(w))
            .wrapping_mul(0x1000_0000_01b3)
            .rotate_left(29);
    }
    for &b in chunks.remainder() {
        h = (h ^ b as u64)
            .wrapping_mul(0x1000_0000_01b3)
            .rotate_left(29);
    }
    h
}

/// Run `op` `n` times; the "null privileged operation" loop each path fills
/// in with its own operation (a syscall, a port write, a call).
#[inline(never)]
pub fn null_loop(n: u64, mut op: impl FnMut()) {
    for _ in 0..n {
        op();
    }
}

/// A function the unikernel calls through a pointer to time an in-ring-0
/// call; `#[inline(never)]` keeps it a real call.
#[inline(never)]
pub extern "C" fn null_call(x: u64) -> u64 {
    x.wrapping_add(1)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec;

    #[test]
    fn depends_only_on_len_and_seed() {
        let mut a = vec![0u8; 4097];
        let mut b = vec![0xffu8; 4097];
        assert_eq!(checksum(&mut a, 7), checksum(&mut b, 7));
        assert_ne!(checksum(&mut a, 7), checksum(&mut b, 8));
        let mut c = vec![0u8; 4096];
        assert_ne!(checksum(&mut a, 7), checksum(&mut c, 7));
    }

    #[test]
    fn detects_a_changed_byte() {
        let mut a = vec![0u8; 1 << 16];
        fill(&mut a, DEFAULT_SEED);
        let h = digest(&a);
        a[12345] ^= 1;
        assert_ne!(h, digest(&a));
    }
}
