//! Any bytes given to the module inspector must produce a result or an
//! error, never a panic, hang or out-of-bounds read.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = hotpatch::module::inspect(data) {
        // Walk everything the inspector returned, as `inspect --json` would.
        let _ = info.functions().count();
        let _ = info.modinfo_all("vermagic");
    }
});
