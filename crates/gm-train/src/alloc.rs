//! A counting global allocator: the bytes a process holds live on its heap, and their peak.
//!
//! The resident set size says little about what a training step needs: gm keeps freed buffers
//! in the process ([`gm_core::keep_freed_memory`]) and glibc's heap keeps freed holes resident,
//! so two runs of equal live memory can differ in RSS by the pattern of their frees. The `gm`
//! binary installs [`Counting`]; `gm bench` reports the peak live bytes of a train step
//! (`peak_live_mb`) beside the RSS. In a program that did not install it the counts stay 0.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// The system allocator, counting the bytes live.
pub struct Counting;

#[allow(unsafe_code)]
// SAFETY: every call is forwarded unchanged to the system allocator; the counters are plain
// atomics and allocate nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

fn grew(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

/// Marks [`Counting`] as the global allocator (the binary that installs it calls this), so
/// reports can tell a count of 0 from "not counted".
pub fn mark_installed() {
    INSTALLED.store(true, Ordering::Relaxed);
}

/// Bytes live on the heap now, if [`Counting`] is installed.
pub fn live_bytes() -> Option<usize> {
    INSTALLED
        .load(Ordering::Relaxed)
        .then(|| LIVE.load(Ordering::Relaxed))
}

/// The most bytes live at once since the last [`reset_peak`] (or the start).
pub fn peak_bytes() -> Option<usize> {
    INSTALLED
        .load(Ordering::Relaxed)
        .then(|| PEAK.load(Ordering::Relaxed))
}

/// Starts a new peak from the bytes live now.
pub fn reset_peak() {
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}
