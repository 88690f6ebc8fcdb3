//! Working memory that the kernels reuse from call to call on each thread.
//!
//! A convolution's working buffers (the Winograd path's input planes, transformed panels and
//! products) are written before they are read, so they need no zeroing; allocating them afresh
//! for every call zeroed them all the same (`vec![0.0; n]` is a `calloc`, and glibc clears
//! reused heap blocks). A network that calls its layers on a few images at a time (the CNF's
//! flow-matching step: eight calls of eight images) spent 7% of its step in `memset` that way.
//! [`Reused`] takes a buffer from the calling thread's free list instead and gives it back when
//! dropped; only a buffer that must grow is extended (with zeros).

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Buffers a thread keeps for reuse.
const KEPT: usize = 8;
/// Largest buffer kept (floats: 64 MiB); a larger one is freed when dropped.
const KEPT_FLOATS: usize = 16 << 20;

thread_local! {
    static FREE: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// `len` floats of working memory whose contents are unspecified (what an earlier user of the
/// buffer left, or zeros): the caller writes every float before reading it.
pub(crate) struct Reused {
    buf: Vec<f32>,
    len: usize,
}

impl Reused {
    pub(crate) fn new(len: usize) -> Self {
        // The smallest kept buffer that holds `len`, else the largest (extended below).
        let kept = FREE.with(|f| {
            let mut f = f.borrow_mut();
            let fits = (0..f.len())
                .filter(|&i| f[i].len() >= len)
                .min_by_key(|&i| f[i].len());
            let pick = fits.or_else(|| (0..f.len()).max_by_key(|&i| f[i].len()));
            pick.map(|i| f.swap_remove(i))
        });
        let mut buf = kept.unwrap_or_default();
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        // Builds with debug assertions (the test suite's) hand out NaNs, so that a kernel that
        // reads a float it did not write shows in its results.
        if cfg!(debug_assertions) {
            buf[..len].fill(f32::NAN);
        }
        Self { buf, len }
    }
}

impl Drop for Reused {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.len() > KEPT_FLOATS {
            return;
        }
        // A thread that has exited has no list to return to; the buffer is then freed.
        let _ = FREE.try_with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < KEPT {
                f.push(buf);
            } else if let Some(i) = (0..f.len()).min_by_key(|&i| f[i].len()) {
                if f[i].len() < buf.len() {
                    f[i] = buf;
                }
            }
        });
    }
}

impl Deref for Reused {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[..self.len]
    }
}

impl DerefMut for Reused {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_sized() {
        let p = {
            let mut a = Reused::new(1000);
            a.fill(3.0);
            a.as_ptr()
        };
        // The same allocation comes back, with what the last user left in it (NaNs in builds
        // with debug assertions).
        let b = Reused::new(500);
        assert_eq!((b.len(), b.as_ptr()), (500, p));
        let left = if cfg!(debug_assertions) {
            f32::NAN
        } else {
            3.0
        };
        assert!(b.iter().all(|&x| x.to_bits() == left.to_bits()));
        // A held buffer is not handed out twice.
        let c = Reused::new(2000);
        assert_ne!(c.as_ptr(), p);
        assert_eq!(c.len(), 2000);
    }
}
