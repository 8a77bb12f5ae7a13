//! The grades of `kaproxy-bench probe`'s cases: 2 good, 1 acceptable, 0 bad.

use super::*;

/// Cases 1-3, 5, 6. Bad: no answer within the bound; a request reached a backend other than
/// the one the routes give to what that backend reads (the path resolved as a lenient backend
/// resolves it, the host after any userinfo); a target that is not origin or absolute form
/// reached a backend. Good: refused with a 4xx, or routed and forwarded in normal form.
/// Acceptable: routed right but forwarded as sent, or closed without an answer, or a 5xx.
pub(super) fn grade_routing(answers: &[Answer]) -> (u8, String) {
    let mut score = 2;
    let mut why = Vec::new();
    for a in answers {
        let (s, w) = grade_one_routing(a);
        score = score.min(s);
        why.push(if answers.len() > 1 {
            format!("{}: {w}", a.label)
        } else {
            w
        });
    }
    (score, why.join("; "))
}

pub(super) fn grade_one_routing(a: &Answer) -> (u8, String) {
    for s in &a.reached {
        match s.routing() {
            Routing::Bypass {
                expected,
                host,
                path,
            } => {
                return (
                    0,
                    format!(
                        "{} got what a backend reads as {host}{path}, which the routes give to {expected}",
                        s.backend
                    ),
                )
            }
            Routing::OddTarget => {
                return (0, format!("the target {:?} reached {} as it was", s.target, s.backend))
            }
            Routing::Normal | Routing::Unnormalized => {}
        }
    }
    if a.reached.is_empty() {
        return match (a.status, a.end) {
            (Some(s), _) if (400..500).contains(&s) => (2, format!("refused with {s}")),
            (Some(s), _) => (1, format!("{s} without reaching a backend")),
            (None, End::Timeout) => (0, "no answer within the bound".to_string()),
            (None, end) => (1, format!("{} without an answer", end.label())),
        };
    }
    if a.status.is_none() && a.end == End::Timeout {
        return (
            0,
            "reached a backend, but no answer within the bound".to_string(),
        );
    }
    if a.reached.iter().all(|s| s.routing() == Routing::Normal) {
        (
            2,
            "routed on the normalized request and forwarded in that form".to_string(),
        )
    } else {
        (
            1,
            "routed right, but forwarded as sent (the backend resolves it again)".to_string(),
        )
    }
}

/// Case 9. Good: one Cookie line `a=1; b=2; c=3` (RFC 9113 §8.2.3). Bad: several lines (a
/// backend that reads one sees one cookie), or the request not served.
pub(super) fn grade_cookies(a: &Answer) -> (u8, String) {
    let Some(seen) = a.reached.first() else {
        return (0, format!("not served: {}", a.text()));
    };
    match seen.cookie.as_slice() {
        [one] if one == "a=1; b=2; c=3" => (2, "one Cookie line with the three crumbs".to_string()),
        [one] => (1, format!("one Cookie line, {one:?}")),
        [] => (0, "no Cookie reached the backend".to_string()),
        many => (
            0,
            format!(
                "{} Cookie lines: a backend that reads one line sees one cookie",
                many.len()
            ),
        ),
    }
}

/// Case 10, per protocol. Good: a 4xx and nothing reached a backend. Acceptable: every field
/// forwarded (the backend's own limit decides; Apache's LimitRequestFields is 100), a close or
/// reset without an answer, or a 5xx. Bad: no answer within the bound, or fields lost on the
/// way.
pub(super) fn grade_fields(answers: &[Answer]) -> (u8, String) {
    let mut score = 2;
    let mut why = Vec::new();
    for a in answers {
        let (s, w) = match (a.status, a.reached.first()) {
            (_, Some(seen)) if seen.fields < FIELDS => (
                0,
                format!(
                    "{} of {FIELDS} fields reached {}",
                    seen.fields, seen.backend
                ),
            ),
            (Some(s), Some(seen)) => (
                1,
                format!(
                    "{s}: all {} fields forwarded to {}",
                    seen.fields, seen.backend
                ),
            ),
            (Some(s), None) if (400..500).contains(&s) => {
                (2, format!("{s}, nothing reached a backend"))
            }
            (Some(s), None) => (1, format!("{s}, nothing reached a backend")),
            (None, _) if a.end == End::Timeout => (0, "no answer within the bound".to_string()),
            (None, _) => (1, format!("{} without an answer", a.end.label())),
        };
        score = score.min(s);
        why.push(format!("{}: {w}", a.label));
    }
    (score, why.join("; "))
}

/// Case 12. Good: a 5xx, or the body re-framed without the extension. Acceptable: a 200 cut
/// short, a close without an answer. Bad: the 1 MiB extension passed on, or no answer.
pub(super) fn grade_bad_chunk(a: &Answer) -> (u8, String) {
    if a.raw_bytes > MIB {
        return (
            0,
            format!("relayed the malformed response ({} bytes)", a.raw_bytes),
        );
    }
    match (a.status, a.end) {
        (Some(s), End::Complete) if s >= 500 => (2, format!("{s}: the malformed response refused")),
        (Some(200), End::Complete) if a.body_bytes == 5 => (
            2,
            "the 5-byte chunk forwarded, re-framed without the extension".to_string(),
        ),
        (Some(s), End::Complete) => (1, format!("{s} with {} body bytes", a.body_bytes)),
        (Some(s), end) => (
            1,
            format!("{s}, then {} (the response cut short)", end.label()),
        ),
        (None, End::Timeout) => (0, "no answer within the bound".to_string()),
        (None, end) => (1, format!("{} without an answer", end.label())),
    }
}

/// Case 14, per protocol. Good: a 4xx/5xx and nothing reached a backend. Bad: forwarded, a
/// 2xx tunnel, or no answer. Acceptable: a close without an answer.
pub(super) fn grade_connect(answers: &[Answer]) -> (u8, String) {
    let mut score = 2;
    let mut why = Vec::new();
    for a in answers {
        let (s, w) = if let Some(seen) = a.reached.first() {
            (0, format!("forwarded to {}", seen.backend))
        } else {
            match a.status {
                Some(s) if (200..300).contains(&s) => (0, format!("{s}: a tunnel")),
                Some(s) if s >= 400 => (2, format!("{s}")),
                Some(s) => (1, format!("{s}")),
                None if a.end == End::Timeout => (0, "no answer within the bound".to_string()),
                None => (1, format!("{} without an answer", a.end.label())),
            }
        };
        score = score.min(s);
        why.push(format!("{}: {w}", a.label));
    }
    (score, why.join("; "))
}
