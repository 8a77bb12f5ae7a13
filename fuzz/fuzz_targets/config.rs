//! The config loader on arbitrary text: parse, validate, build the timeline, print the report
//! (what `kaproxy check` prints). Nothing may panic, and the two entry points must agree.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    // TOML is UTF-8; invalid bytes become U+FFFD so that every input still reaches the parser.
    let src = String::from_utf8_lossy(data);
    let path = Path::new("fuzz.toml");
    let report = kaproxy::config::check_str(&src, path);
    let text = format!("{report}");
    let ok = report.is_ok();
    if ok {
        assert!(text.ends_with("fuzz.toml: OK\n"), "{text}");
    } else {
        assert!(text.contains("fuzz.toml"), "{text}");
    }
    if let Ok((config, timeline)) = report.into_result() {
        let _ = format!("{timeline}");
        let _ = format!("{config:?}");
    }
});
