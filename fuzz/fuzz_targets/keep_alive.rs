//! `Keep-Alive` header values from a backend: lenient, never panics, and never invents a value.
#![no_main]

use kaproxy::upstream::keep_alive::KeepAliveHint;
use libfuzzer_sys::fuzz_target;
use std::time::Duration;

fuzz_target!(|data: &[u8]| {
    let hint = KeepAliveHint::parse(data);
    // Whatever was learned is written, in decimal, somewhere in the input.
    let text = String::from_utf8_lossy(data);
    if let Some(t) = hint.timeout {
        assert!(
            text.contains(&t.as_secs().to_string()),
            "timeout {t:?} from {text:?}"
        );
    }
    if let Some(m) = hint.max {
        assert!(text.contains(&m.to_string()), "max {m} from {text:?}");
    }
    // Non-UTF-8 is ignored as a whole.
    if std::str::from_utf8(data).is_err() {
        assert_eq!(hint, KeepAliveHint::default());
    }
    // Round trip: the first 12 bytes as numbers, written the way Apache writes them.
    if data.len() >= 12 {
        let n = u64::from_le_bytes(data[..8].try_into().unwrap());
        let m = u32::from_le_bytes(data[8..12].try_into().unwrap());
        let hint = KeepAliveHint::parse(format!("timeout={n}, max={m}").as_bytes());
        assert_eq!(hint.timeout, Some(Duration::from_secs(n)));
        assert_eq!(hint.max, Some(m));
    }
});
