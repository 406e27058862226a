//! Fuzz target `close_payload`: Close frame payloads: parse, re-encode, parse again.
//!
//! The body is `wsring::proto::fuzzing::close_payload`; `tests/fuzz_corpus.rs` replays the seed
//! corpus in `fuzz/corpus/close_payload/` through it on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| wsring::proto::fuzzing::close_payload(data));
