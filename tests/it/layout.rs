//! The module layout of `src/` (see `src/lib.rs`, "# Layout"): data flows downstream → proxy →
//! upstream, and no module imports from a layer above its own. Read from the source files, so
//! a `use` that points the wrong way fails here with the file and line.

use std::path::{Path, PathBuf};

/// The ground floor: what every floor may name.
const GROUND: &[&str] = &[
    "metrics", "config", "body", "headers", "http1", "error", "sync", "workers", "shutdown",
];

/// Each floor (a folder or file of `src/`) and the top-level modules of ours it may name,
/// outside its unit tests (`lib.rs`, "# Layout"): server → control → downstream → proxy →
/// upstream → ground. `server.rs` and `main.rs` sit on top and may name anything.
fn floors() -> Vec<(&'static str, Vec<&'static str>)> {
    let with_ground =
        |own: &[&'static str]| -> Vec<&'static str> { own.iter().chain(GROUND).copied().collect() };
    vec![
        (
            "src/control",
            with_ground(&["control", "downstream", "proxy", "upstream"]),
        ),
        // The client side never reaches past the proxy into the backend side.
        ("src/downstream", with_ground(&["downstream", "proxy"])),
        ("src/proxy", with_ground(&["proxy", "upstream"])),
        ("src/upstream", with_ground(&["upstream"])),
        // Ground: bodies and errors name the metrics, the config and each other (errors the
        // codec's too, whose failures they carry); the rest names nothing of ours.
        (
            "src/body",
            vec![
                "body", "config", "metrics", "sync", "error", "headers", "http1",
            ],
        ),
        ("src/error.rs", vec!["body", "config", "http1", "metrics"]),
        ("src/config", vec!["config"]),
        ("src/metrics.rs", vec![]),
        ("src/headers.rs", vec![]),
        ("src/http1", vec!["http1"]),
        ("src/sync.rs", vec![]),
        ("src/shutdown.rs", vec![]),
        ("src/workers.rs", vec![]),
    ]
}

/// The top-level modules of ours a piece of code names, with `crate::a::b` and grouped
/// `use crate::{a::b, c::{d, e}}` imports alike (the group may span lines).
fn named_modules(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the group: split at commas outside nested braces.
            let (mut depth, mut item_start, mut end) = (0usize, 0usize, group.len());
            let mut items = Vec::new();
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        end = j;
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        items.push(&group[item_start..j]);
                        item_start = j + 1;
                    }
                    _ => {}
                }
            }
            items.push(&group[item_start..end]);
            for item in items {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.push(name);
                }
            }
            rest = &group[end..];
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.push(name);
        }
    }
    out
}

/// The source's code: without its `#[cfg(test)] mod tests` block (tests may reach anywhere)
/// and without comments, lines kept.
fn code_of(src: &str) -> String {
    without_tests(src)
        .lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn rust_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(path).expect("read src dir") {
        let p = entry.expect("dir entry").path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
    out
}

/// The source without its `#[cfg(test)] mod tests` block (tests may reach anywhere).
fn without_tests(src: &str) -> &str {
    match src.find("#[cfg(test)]\nmod tests") {
        Some(i) => &src[..i],
        None => src,
    }
}

#[test]
fn no_module_imports_from_a_floor_above_its_own() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut wrong = Vec::new();
    for (floor, allowed) in floors() {
        let files = rust_files(&root.join(floor));
        assert!(
            !files.is_empty(),
            "{floor}: no Rust files (layout changed?)"
        );
        for file in files {
            let src = std::fs::read_to_string(&file).expect("read source");
            let rel = file
                .strip_prefix(root)
                .unwrap_or(&file)
                .display()
                .to_string();
            let code = code_of(&src);
            let lines: Vec<&str> = code.lines().collect();
            for (n, line) in lines.iter().enumerate() {
                // A grouped import may span lines: read it to the end of its statement.
                let text = if line.contains("crate::{") {
                    let len = lines[n..]
                        .iter()
                        .position(|l| l.contains(';'))
                        .map_or(lines.len() - n, |i| i + 1);
                    lines[n..n + len].join(" ")
                } else {
                    line.to_string()
                };
                for module in named_modules(&text) {
                    if !allowed.contains(&module.as_str()) {
                        wrong.push(format!(
                            "{rel}:{}: {floor} must not name crate::{module}: {}",
                            n + 1,
                            line.trim()
                        ));
                    }
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layout:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_layout_rule_sees_plain_and_grouped_imports() {
    assert_eq!(
        named_modules("use crate::upstream::pool::Pool;"),
        ["upstream"]
    );
    assert_eq!(
        named_modules("use crate::{proxy::Proxy, upstream::{pool, tls}};"),
        ["proxy", "upstream"]
    );
    assert_eq!(
        named_modules("let x = crate::headers::KEEP_ALIVE; crate::sync::lock(&m);"),
        ["headers", "sync"]
    );
    // A planted upward import in the client side is caught.
    let planted = "use crate::{\n    config::Config,\n    upstream::pool::Pool,\n};";
    let allowed = &floors()
        .into_iter()
        .find(|(f, _)| *f == "src/downstream")
        .unwrap()
        .1;
    let named = named_modules(&planted.replace('\n', " "));
    assert!(
        named.iter().any(|m| !allowed.contains(&m.as_str())),
        "{named:?}"
    );
}
