//! Fuzz target: a snapshot file of arbitrary bytes is read and verified
//! (`vmm::snapshot::read`): it is refused with an error or read whole,
//! never a panic, a hang or an allocation the file does not back.
#![no_main]

use std::io::Write;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("colo-fuzz-snapshot-{}", std::process::id()));
    let written = std::fs::File::create(&path).and_then(|mut f| f.write_all(data));
    if written.is_ok() {
        let _ = vmm::snapshot::read(&path);
    }
});
