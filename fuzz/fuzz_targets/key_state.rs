//! libFuzzer target: `kvs::fuzz::key_state` (its properties are in `src/fuzz.rs`).
#![no_main]

// Counts allocations, so the target checks what decoding allocates.
#[global_allocator]
static ALLOC: kvs::fuzz::CountingAlloc = kvs::fuzz::CountingAlloc;

libfuzzer_sys::fuzz_target!(|data: &[u8]| kvs::fuzz::key_state(data));
