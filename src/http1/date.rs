//! Owns the `Date` field value of kaproxy's own responses (RFC 9110 §6.6.1: an origin
//! "MUST" send one; a proxy adds it when the backend did not, as hyper's server does):
//! formatted once a second per thread, in IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::BytesMut;

/// The length of an IMF-fixdate.
const LEN: usize = 29;

thread_local! {
    /// The second formatted last, and its text.
    static CACHED: RefCell<(u64, [u8; LEN])> = const { RefCell::new((u64::MAX, [0; LEN])) };
}

/// Appends the current date to `dst`.
pub fn extend(dst: &mut BytesMut) {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != secs {
            let text = httpdate::fmt_http_date(now);
            if text.len() == LEN {
                cached.1.copy_from_slice(text.as_bytes());
                cached.0 = secs;
            } else {
                // Not reachable for dates between 1970 and 9999; written as is.
                dst.extend_from_slice(text.as_bytes());
                return;
            }
        }
        dst.extend_from_slice(&cached.1);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_date_is_an_imf_fixdate_of_now() {
        let mut dst = BytesMut::new();
        extend(&mut dst);
        let text = std::str::from_utf8(&dst).unwrap();
        assert_eq!(text.len(), LEN);
        assert!(text.ends_with(" GMT"), "{text}");
        let parsed = httpdate::parse_http_date(text).unwrap();
        let age = SystemTime::now().duration_since(parsed).unwrap();
        assert!(age.as_secs() <= 2, "{text} is now");
    }
}
