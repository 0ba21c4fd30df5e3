//! Heap accounting: the bytes this process's allocator has handed out and
//! not taken back.
//!
//! [`Counting`] wraps the global allocator and, once [`enable`]d, keeps a
//! running total of the bytes allocated minus the bytes freed (the sizes
//! asked for, not the allocator's size classes or pages). Unlike RSS, which
//! moves in pages and keeps what an allocator does not give back, the total
//! goes down when memory is freed, so the difference between two readings
//! is exactly what was kept in between: the `scale` benchmark judges
//! "nothing per waiting run" by it.
//!
//! Off by default: counting costs an atomic add per allocation and per
//! free, shared by every thread. The binary enables it at start when
//! `RUNFLEET_HEAP_ACCOUNTING=1`, and `/metrics` then serves the total as
//! `runfleet_heap_bytes`. Off, each allocation pays one relaxed load.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};

/// The environment variable that switches heap accounting on (`1`).
pub const ENV: &str = "RUNFLEET_HEAP_ACCOUNTING";

static ENABLED: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicIsize = AtomicIsize::new(0);

/// A global allocator that forwards every call to `A` and, when heap
/// accounting is on, counts the bytes in use.
#[derive(Debug)]
pub struct Counting<A>(A);

impl<A> Counting<A> {
    pub const fn new(inner: A) -> Self {
        Self(inner)
    }
}

/// Switches heap accounting on from the environment ([`ENV`] = `1`); call
/// first thing in `main`, before the process allocates much: what was
/// allocated earlier and is freed later is subtracted without having been
/// added, which shifts the total but not the difference between two
/// readings.
pub fn enable_from_env() {
    if std::env::var_os(ENV).is_some_and(|value| value == "1") {
        enable();
    }
}

/// Switches heap accounting on.
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// The bytes allocated and not freed since accounting was switched on, or
/// `None` if it is off.
pub fn live_bytes() -> Option<i64> {
    ENABLED.load(Ordering::Relaxed).then(|| LIVE.load(Ordering::Relaxed) as i64)
}

#[inline]
fn count(delta: isize) {
    if ENABLED.load(Ordering::Relaxed) {
        LIVE.fetch_add(delta, Ordering::Relaxed);
    }
}

/// The size of a layout as a signed count (`Layout` guarantees it fits).
#[inline]
fn size(layout: Layout) -> isize {
    layout.size() as isize
}

// SAFETY: every method forwards its arguments unchanged to the wrapped
// allocator and returns its result unchanged, so `Counting<A>` upholds
// `GlobalAlloc`'s contract exactly as `A` does. The counting itself only
// touches two atomics: it never allocates and never unwinds.
#[allow(unsafe_code)]
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees for `layout` are passed on.
        let ptr = unsafe { self.0.alloc(layout) };
        if !ptr.is_null() {
            count(size(layout));
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { self.0.alloc_zeroed(layout) };
        if !ptr.is_null() {
            count(size(layout));
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller guarantees `ptr` came from this allocator (so
        // from `A`) with `layout`.
        unsafe { self.0.dealloc(ptr, layout) };
        count(-size(layout));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`, and the caller guarantees `new_size`
        // is valid for `layout`'s alignment.
        let new = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            count(new_size as isize - size(layout));
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use std::alloc::System;

    use super::*;

    /// The wrapper counts what goes through it: an allocation adds its
    /// size, a reallocation the difference, a free takes it back.
    #[test]
    #[allow(unsafe_code)]
    fn counts_what_is_allocated_and_freed() {
        let allocator = Counting::new(System);
        enable();
        let layout = Layout::from_size_align(1000, 8).unwrap_or_else(|e| panic!("{e}"));
        // The test binary's global allocator is the system one, so only
        // `allocator` moves the counter.
        let before = live_bytes().unwrap_or_else(|| panic!("accounting is on"));
        let live = || live_bytes().unwrap_or_default() - before;
        // SAFETY: a non-zero size; freed below with the layout it has then.
        let ptr = unsafe { allocator.alloc(layout) };
        assert!(!ptr.is_null());
        assert_eq!(live(), 1000);
        // SAFETY: `ptr` came from `allocator.alloc(layout)`.
        let ptr = unsafe { allocator.realloc(ptr, layout, 3000) };
        assert!(!ptr.is_null());
        assert_eq!(live(), 3000);
        let grown = Layout::from_size_align(3000, 8).unwrap_or_else(|e| panic!("{e}"));
        // SAFETY: `ptr` came from `realloc` to 3,000 bytes.
        unsafe { allocator.dealloc(ptr, grown) };
        assert_eq!(live(), 0);
    }
}
