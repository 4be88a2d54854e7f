//! Allocation accounting: the global allocator the fuzz binaries install, and the
//! check that decoding allocates in proportion to the input.

use super::*;

/// Bytes a decoder may allocate per input byte. Decoded values are larger than their
/// encodings (a one-byte empty string is a 24-byte `String`, a version vector of one
/// entry a B-tree leaf of a few hundred bytes, growing `Vec`s double), so this is
/// generous; what it must catch is allocation that a length field drives, which is
/// unbounded per input byte.
pub const ALLOC_PER_INPUT_BYTE: usize = 512;
/// Bytes any input may allocate on top: serde preallocates up to 1 MiB for a sequence
/// whose declared length it cannot yet check (`serde::de::size_hint::cautious`), and
/// nested sequences (a page of states, a state's versions, ...) each do, one chain at a
/// time.
pub const ALLOC_BASE: usize = 8 << 20;

thread_local! {
    /// Inputs this thread's targets decoded (or parsed) successfully: see [`take_decoded`].
    static DECODED: Cell<u64> = const { Cell::new(0) };
}

/// Counts one input that got past its decoder, so a run can say how many did.
pub(super) fn decoded() {
    DECODED.with(|d| d.set(d.get() + 1));
}

/// How many inputs this thread's targets decoded since the last call (an input some
/// part of the target accepted: a form, a token, a message, a WAL file that opened).
pub fn take_decoded() -> u64 {
    DECODED.with(|d| d.replace(0))
}

thread_local! {
    /// Bytes this thread has allocated and not freed (through [`CountingAlloc`]).
    static LIVE: Cell<isize> = const { Cell::new(0) };
    /// The most [`LIVE`] reached since [`peak_allocation`] reset it.
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

pub(super) fn account(delta: isize) {
    // `try_with`: a thread being torn down may still free memory; its counts no longer
    // matter. Neither cell allocates.
    let _ = LIVE.try_with(|live| {
        let now = live.get().wrapping_add(delta);
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

pub(super) fn size(bytes: usize) -> isize {
    isize::try_from(bytes).unwrap_or(isize::MAX)
}

/// The system allocator, counting each thread's live bytes and their peak, so a fuzz
/// target can check what a decoder allocated ([`peak_allocation`]). Install it with
/// `#[global_allocator]` in the binary that runs the targets.
pub struct CountingAlloc;

// SAFETY: every call is forwarded to `System` unchanged; the counting touches only
// thread-local cells, which neither allocate nor unwind.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            account(size(layout.size()));
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            account(size(layout.size()));
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        account(-size(layout.size()));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            // Counted as if both blocks were live for a moment, as they may be.
            account(size(new_size));
            account(-size(layout.size()));
        }
        p
    }
}

/// Runs `f` and returns its result with the most bytes this thread had allocated at once
/// while it ran, beyond what it held before; `None` when [`CountingAlloc`] is not the
/// global allocator.
pub fn peak_allocation<R>(f: impl FnOnce() -> R) -> (R, Option<usize>) {
    let live = || LIVE.try_with(Cell::get).unwrap_or(0);
    let probe = std::hint::black_box(Box::new([0u8; 64]));
    let counting = live() != 0 && {
        let before = live();
        drop(probe);
        live() != before
    };
    let start = live();
    let _ = PEAK.try_with(|p| p.set(start));
    let result = f();
    let peak = PEAK.try_with(Cell::get).unwrap_or(start);
    let grown = usize::try_from(peak.saturating_sub(start)).unwrap_or(0);
    (result, counting.then_some(grown))
}

/// Panics if decoding `len` bytes for `target` allocated more than the bound.
pub(super) fn check_alloc(target: &str, len: usize, peak: Option<usize>) {
    if let Some(peak) = peak {
        let bound = ALLOC_BASE.saturating_add(len.saturating_mul(ALLOC_PER_INPUT_BYTE));
        assert!(
            peak <= bound,
            "{target}: decoding {len} bytes allocated {peak} bytes at once (bound {bound})"
        );
    }
}
