//! Replays the committed fuzz seed corpus (`fuzz/corpus/<target>/`) through the fuzz target
//! bodies in `wsring::proto::fuzzing` and `wsring::engine::internals::fuzzing`, so every seed and every past crash is checked by
//! `cargo test` on stable, without libFuzzer.

use std::fs;
use std::path::PathBuf;

fn replay(target: &str, body: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join("corpus")
        .join(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} has no seeds", dir.display());
    for path in files {
        let data = fs::read(&path).expect("read seed");
        eprintln!("{target}: {}", path.display());
        body(&data);
    }
}

#[test]
fn handshake_corpus_replays_without_panics() {
    replay("handshake", wsring::proto::fuzzing::handshake);
}

#[test]
fn frames_corpus_replays_without_panics() {
    replay("frames", wsring::proto::fuzzing::frames);
}

#[test]
fn close_payload_corpus_replays_without_panics() {
    replay("close_payload", wsring::proto::fuzzing::close_payload);
}

#[test]
fn worker_corpus_replays_without_panics() {
    replay("worker", wsring::engine::internals::fuzzing::worker);
}
