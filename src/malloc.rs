//! glibc malloc settings for training: keep freed activation buffers for reuse instead of
//! returning them to the OS.
//!
//! A training step allocates and frees megabyte-sized buffers (activations, gradients,
//! logits) hundreds of times. glibc serves those from `mmap` and unmaps them on `free`, so
//! every step pays for fresh zeroed pages (page faults and kernel page clearing) and for the
//! TLB shootdowns of `munmap` on the other core. Measured on the workload's tiny training step
//! (`/usr/bin/time` around `rlhf bench train --model tiny`): 522k → 132k minor page faults and
//! 2.6 → 0.6 s of system time for the same 25 steps.
//!
//! The heap is never trimmed either: a step of a real model frees more than any fixed
//! threshold (SmolLM2-135M's PPO update frees 1.1 GB of gradients for the policy and the
//! critic), and with glibc's trimming back to 1 GiB every step faulted that memory in again
//! (`rlhf ppo` on SmolLM2, 3 iterations: 6.1 M → 1.8 M minor faults, 36.8 → 21.5 s of system
//! time, updates 24–25 s → 17–24 s; peak RSS 6.7 GB either way). The cost is that the process
//! keeps its peak heap for reuse instead of returning it, as PyTorch's caching allocator does.

/// Allocations up to this size come from the heap (glibc's default is a dynamic threshold
/// starting at 128 KiB).
pub const MMAP_THRESHOLD: usize = 256 << 20;
/// glibc's `M_TRIM_THRESHOLD` value that turns trimming off.
pub const NO_TRIM: libc::c_int = -1;
/// Extra memory requested with each heap extension.
pub const TOP_PAD: usize = 64 << 20;

/// Applies the settings above (glibc on Linux; elsewhere nothing). Returns whether all were
/// accepted. Call once at start-up, before the worker threads allocate.
pub fn tune_for_training() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it takes plain integers.
        unsafe {
            let a = libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
            let b = libc::mallopt(libc::M_TRIM_THRESHOLD, NO_TRIM);
            let c = libc::mallopt(libc::M_TOP_PAD, TOP_PAD as libc::c_int);
            a == 1 && b == 1 && c == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    #[test]
    fn glibc_accepts_the_settings() {
        assert!(super::tune_for_training());
    }
}
