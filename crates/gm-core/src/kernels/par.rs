//! Data-parallel loops of gm's CPU kernels, run on candle's own thread pool.
//!
//! candle's CPU element-wise ops run on a pool of `threads − 1` workers plus the calling thread
//! ([`candle_core::utils::barrier_pool`]; `threads` from `CANDLE_NUM_THREADS` or
//! `RAYON_NUM_THREADS`, else the physical cores). Its workers spin for a while after each op
//! before they park. gm's convolutions, norms and optimizer run on the *same* threads, so that a
//! training step keeps exactly `threads` threads busy: a second pool (rayon's) would leave
//! candle's worker spinning on a core while gm's kernels want it.
//!
//! Tasks are handed out one at a time from a shared counter, so a thread slowed by a noisy
//! neighbour takes fewer of them. A loop started from inside a task runs inline on that thread.

#![allow(unsafe_code)]

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

thread_local! {
    /// Set while this thread runs tasks of a parallel loop.
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

/// Threads a parallel loop runs on (the calling thread included).
pub fn threads() -> usize {
    candle_core::utils::barrier_pool().n_workers() + 1
}

/// Calls `f(task)` once for every `task < tasks`, spread over the pool.
pub fn for_each(tasks: usize, f: impl Fn(usize) + Sync) {
    let pool = candle_core::utils::barrier_pool();
    if tasks <= 1 || pool.n_workers() == 0 || IN_TASK.with(Cell::get) {
        (0..tasks).for_each(f);
        return;
    }
    let next = AtomicUsize::new(0);
    pool.execute(|_| {
        let _mark = TaskMark::new();
        loop {
            let task = next.fetch_add(1, Ordering::Relaxed);
            if task >= tasks {
                break;
            }
            f(task);
        }
    });
}

/// Marks the current thread as running tasks until dropped (also when a task panics).
struct TaskMark(bool);

impl TaskMark {
    fn new() -> Self {
        Self(IN_TASK.with(|t| t.replace(true)))
    }
}

impl Drop for TaskMark {
    fn drop(&mut self) {
        IN_TASK.with(|t| t.set(self.0));
    }
}

/// `f(task)` for every `task < tasks`, in parallel, collected in task order.
pub fn map<R: Send>(tasks: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let slots: Vec<Mutex<Option<R>>> = (0..tasks).map(|_| Mutex::new(None)).collect();
    for_each(tasks, |t| {
        let r = f(t);
        *slots[t].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
    });
    slots
        .into_iter()
        .map(|s| {
            s.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .expect("every task ran")
        })
        .collect()
}

/// A raw pointer that may cross threads; each task derives a disjoint slice from it.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: only used by `chunks_mut`, whose tasks touch disjoint ranges of one exclusive borrow.
unsafe impl<T: Send> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    fn get(&self) -> *mut T {
        self.0
    }
}

/// Calls `f(i, chunk)` for the consecutive chunks of `len` elements of `data` (the last one may
/// be shorter), in parallel.
pub fn chunks_mut<T: Send>(data: &mut [T], len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let len = len.max(1);
    let total = data.len();
    let base = SendPtr(data.as_mut_ptr());
    for_each(total.div_ceil(len), |i| {
        let start = i * len;
        let n = len.min(total - start);
        // SAFETY: chunk i is [i·len, i·len + n) of `data`, which is exclusively borrowed for
        // the whole loop; no two tasks share an index, so the chunks never overlap.
        let chunk = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), n) };
        f(i, chunk);
    });
}

/// [`chunks_mut`] over two slices at once: `f(i, a_chunk, b_chunk)` for the `i`-th chunks of
/// `len_a` elements of `a` and `len_b` of `b`, which must have as many chunks.
pub fn chunks2_mut<A: Send, B: Send>(
    a: &mut [A],
    len_a: usize,
    b: &mut [B],
    len_b: usize,
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
) {
    let (len_a, len_b) = (len_a.max(1), len_b.max(1));
    let (total_a, total_b) = (a.len(), b.len());
    let tasks = total_a.div_ceil(len_a);
    assert_eq!(
        tasks,
        total_b.div_ceil(len_b),
        "chunks2_mut: chunk counts differ"
    );
    let (pa, pb) = (SendPtr(a.as_mut_ptr()), SendPtr(b.as_mut_ptr()));
    for_each(tasks, |i| {
        let (sa, sb) = (i * len_a, i * len_b);
        // SAFETY: as in `chunks_mut`, for each of the two exclusively borrowed slices.
        let (ca, cb) = unsafe {
            (
                std::slice::from_raw_parts_mut(pa.get().add(sa), len_a.min(total_a - sa)),
                std::slice::from_raw_parts_mut(pb.get().add(sb), len_b.min(total_b - sb)),
            )
        };
        f(i, ca, cb);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_element_once() {
        let mut v = vec![0u32; 1003];
        chunks_mut(&mut v, 10, |i, c| {
            for (j, x) in c.iter_mut().enumerate() {
                *x += (i * 10 + j) as u32 + 1;
            }
        });
        assert!(v.iter().enumerate().all(|(i, x)| *x == i as u32 + 1));
    }

    #[test]
    fn map_keeps_task_order_and_nests() {
        let out = map(37, |t| map(3, |u| t * 3 + u).into_iter().sum::<usize>());
        let want: Vec<usize> = (0..37).map(|t| 9 * t + 3).collect();
        assert_eq!(out, want);
    }
}
