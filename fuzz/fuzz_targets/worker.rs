//! Fuzz target `worker`: one engine worker core driven by arbitrary interleavings of
//! accepts, reads, flushes, completions, EOFs, publishes and time, through a fake backend.
//!
//! The body is `wsring::engine::internals::fuzzing::worker`; `tests/fuzz_corpus.rs` replays the
//! seed corpus in `fuzz/corpus/worker/` through it on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| wsring::engine::internals::fuzzing::worker(data));
