//! The module layout of `src/` (see `src/lib.rs`, "# Layout"): data flows downstream → proxy →
//! upstream, and no module imports from a layer above its own. Read from the source files, so
//! a `use` that points the wrong way fails here with the file and line.

use std::path::{Path, PathBuf};

/// Paths a layer must not name, outside its unit tests.
const RULES: &[(&str, &[&str])] = &[
    (
        "src/upstream",
        &[
            "crate::proxy",
            "crate::downstream",
            "crate::server",
            "crate::ops::admin",
            "crate::ops::history",
            "crate::ops::reload",
        ],
    ),
    (
        "src/proxy",
        &[
            "crate::downstream",
            "crate::server",
            "crate::ops::admin",
            "crate::ops::history",
            "crate::ops::reload",
        ],
    ),
    (
        "src/downstream",
        &[
            "crate::server",
            "crate::ops::admin",
            "crate::ops::history",
            "crate::ops::reload",
        ],
    ),
    ("src/ops/metrics.rs", &["crate::"]),
    // The worker threads are below everything that runs on them.
    ("src/workers.rs", &["crate::"]),
    (
        "src/config",
        &[
            "crate::downstream",
            "crate::proxy",
            "crate::upstream",
            "crate::ops",
            "crate::server",
        ],
    ),
    // Bodies sit beside the pipeline; like error.rs they name only the metrics of ops.
    (
        "src/body",
        &[
            "crate::downstream",
            "crate::proxy",
            "crate::upstream",
            "crate::ops::admin",
            "crate::ops::history",
            "crate::ops::reload",
            "crate::server",
        ],
    ),
    // error.rs maps its errors to the metrics' ErrorKind, and names nothing else of ours.
    (
        "src/error.rs",
        &[
            "crate::downstream",
            "crate::proxy",
            "crate::upstream",
            "crate::ops::admin",
            "crate::ops::reload",
            "crate::server",
        ],
    ),
];

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
fn no_module_imports_from_a_layer_above_its_own() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut wrong = Vec::new();
    for (layer, forbidden) in RULES {
        let files = rust_files(&root.join(layer));
        assert!(
            !files.is_empty(),
            "{layer}: no Rust files (layout changed?)"
        );
        for file in files {
            let src = std::fs::read_to_string(&file).expect("read source");
            for (n, line) in without_tests(&src).lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for f in *forbidden {
                    if code.contains(f) {
                        let rel = file
                            .strip_prefix(root)
                            .unwrap_or(&file)
                            .display()
                            .to_string();
                        wrong.push(format!(
                            "{rel}:{}: {layer} must not name {f}: {}",
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
