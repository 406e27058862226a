//! Fuzz target `frames`: client byte streams fed to a server `Connection` in pieces.
//!
//! The body is `wsring::proto::fuzzing::frames`; `tests/fuzz_corpus.rs` replays the seed
//! corpus in `fuzz/corpus/frames/` through it on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| wsring::proto::fuzzing::frames(data));
