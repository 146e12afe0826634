//! Software prefetch: asking the CPU to start loading memory a pass will read a few iterations from now.
//!
//! A pass over every account of a shard (a stress test) reads, per account, its record in the account array and
//! two heap objects that record points to (balances, positions). The array is read in order, but those objects are
//! wherever the allocator put them, and the record's own lines are far enough apart (an `Account` is 256 bytes, of
//! which a pass reads one line) that the hardware's stream prefetcher does not run ahead of the loop. Each
//! account then waits for its loads in turn: on the 2-vCPU VM of `docs/performance.md` a load that misses every
//! cache takes 170–290 ns when it waits on the one before, against about 10 ns a line when many are in flight.
//! Prefetching the records of accounts a few places ahead, and the objects of the accounts nearer, puts those
//! loads in flight together.
//!
//! This is the workspace's only `unsafe` code (STYLE.md: one small module, each use with its `SAFETY` reason):
//! the instruction is a hint with no effect a program can observe, but the intrinsic that emits it is an
//! `unsafe fn` because it takes a raw pointer. The functions below take references, so callers stay safe.
#![allow(unsafe_code)]

/// The most cache lines [`slice`] prefetches: enough for the few positions or balances an account holds,
/// without flooding the memory system for an account holding many.
const LINES_MAX: usize = 4;
const LINE: usize = 64;

/// Starts loading the cache line holding the start of `*value` (not what `value` points to, if it is a pointer).
#[inline(always)]
pub fn value<T>(value: &T) {
    line((value as *const T).cast());
}

/// Starts loading the first lines (at most four, 256 bytes) of the elements of `items`.
#[inline(always)]
pub fn slice<T>(items: &[T]) {
    let start: *const u8 = items.as_ptr().cast();
    let bytes = std::mem::size_of_val(items);
    let mut offset = 0;
    while offset < bytes && offset < LINES_MAX * LINE {
        // Stays within `items` (offset < its size), so `wrapping_add` never actually wraps.
        line(start.wrapping_add(offset));
        offset += LINE;
    }
}

/// Starts loading the first line of each of the first four elements of `items`: for elements of a line or more
/// whose fields a pass reads all sit in their first line (a [`Position`](crate::account::Position)).
#[inline(always)]
pub fn heads<T>(items: &[T]) {
    for item in items.iter().take(LINES_MAX) {
        value(item);
    }
}

#[inline(always)]
fn line(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 never faults and changes nothing the program can observe (it only warms the caches),
    // whatever the address; SSE, which the intrinsic needs, is part of every x86_64 target.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
