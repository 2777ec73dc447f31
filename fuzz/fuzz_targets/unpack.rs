//! The layer path an image takes: gzip or plain tar, whiteouts, owners and
//! device nodes, into a fresh directory. Whatever the bytes, unpacking
//! must not panic, and must not touch anything outside its directory: a
//! sibling directory with one file in it must stay exactly so.
#![no_main]

use std::io::Read;
use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use shoal_agent::unpack::{UnpackOptions, unpack};

fn base() -> PathBuf {
    std::env::temp_dir().join(format!("shoal-fuzz-{}", std::process::id()))
}

fuzz_target!(|data: &[u8]| {
    let base = base();
    let dest = base.join("dest");
    let outside = base.join("outside");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("sentinel"), b"keep").unwrap();
    // Bounded as the image store bounds a layer (smaller, for speed).
    let reader: Box<dyn Read> = if data.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::GzDecoder::new(data).take(16 << 20))
    } else {
        Box::new(data)
    };
    let _ = unpack(reader, &dest, UnpackOptions { whiteouts: true, preserve_owners: true });
    let names: Vec<_> = std::fs::read_dir(&outside).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["sentinel"], "an entry escaped into a sibling directory");
    assert_eq!(std::fs::read(outside.join("sentinel")).unwrap(), b"keep");
    let top: Vec<_> = std::fs::read_dir(&base).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(top.len(), 2, "an entry escaped next to the layer: {top:?}");
    std::fs::remove_dir_all(&base).unwrap();
});
