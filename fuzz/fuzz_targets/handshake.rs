//! Fuzz target `handshake`: Upgrade requests: parse, validate, answer.
//!
//! The body is `wsring::proto::fuzzing::handshake`; `tests/fuzz_corpus.rs` replays the seed
//! corpus in `fuzz/corpus/handshake/` through it on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| wsring::proto::fuzzing::handshake(data));
