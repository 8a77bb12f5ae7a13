//! Configuration problems: file, line, dotted key, reason and fix; finding a key's line.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml_edit::{ImDocument, Item};

// ---- Errors ----

/// Why a config was refused. Its `Display` names the file, and for each problem the line,
/// the dotted key, the reason and a fix, one problem per line:
///
/// `config.toml:12: upstreams.web.idle_timeout: must be less than keepalive_timeout -
/// safety_margin (5s - 500ms = 4.5s), got 6s; set idle_timeout = "4s"`
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read config file: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key, a wrong type (one problem: parsing stops there), or every
    /// validation problem at once.
    #[error("{}", lines(.0))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// The problems found; empty when the file could not be read.
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid(problems) => problems,
            ConfigError::Read { .. } => &[],
        }
    }
}

pub(super) fn lines(problems: &[Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(Problem::to_string).collect();
    lines.join("\n")
}

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based; None when the key is not in the file (a missing table).
    pub line: Option<usize>,
    /// Dotted path such as `upstreams.web.servers[1].weight`; empty for a syntax error.
    pub key: String,
    pub message: String,
    /// What to write instead, when there is one clear answer.
    pub fix: Option<String>,
}

impl Problem {
    pub(super) fn new(key: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            file: PathBuf::new(),
            line: None,
            key: key.into(),
            message: message.into(),
            fix: None,
        }
    }

    pub(super) fn fix(mut self, fix: impl Into<String>) -> Problem {
        self.fix = Some(fix.into());
        self
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)?;
        match &self.fix {
            Some(fix) => write!(f, "; {fix}"),
            None => Ok(()),
        }
    }
}

/// A syntax or serde error, with its line and, from the span, the key it is about.
pub(super) fn toml_problem(err: &toml::de::Error, src: &str, path: &Path) -> Problem {
    let at = err.span().map(|span| span.start);
    let doc = ImDocument::parse(src).ok();
    let key = at
        .zip(doc.as_ref())
        .and_then(|(at, doc)| key_at(doc.as_item(), at, ""));
    let mut message = err
        .message()
        .trim()
        .lines()
        .collect::<Vec<_>>()
        .join("; ")
        .replacen("unknown field", "unknown key", 1);
    if message.ends_with("expected a duration") {
        message.push_str(r#" such as "250ms", "4s" or "1m""#);
    }
    Problem {
        file: path.to_path_buf(),
        line: at.map(|at| line_at(src, at)),
        key: key.unwrap_or_default(),
        message,
        fix: None,
    }
}

/// The dotted path of the deepest key or value whose span holds byte `at`.
pub(super) fn key_at(item: &Item, at: usize, path: &str) -> Option<String> {
    let holds = |span: Option<Range<usize>>| span.is_some_and(|s| s.contains(&at) || s.start == at);
    if let Some(table) = item.as_table_like() {
        for (name, child) in table.iter() {
            let child_path = match path {
                "" => name.to_owned(),
                _ => format!("{path}.{name}"),
            };
            if holds(table.get_key_value(name).and_then(|(key, _)| key.span())) {
                return Some(child_path);
            }
            if let Some(found) = key_at(child, at, &child_path) {
                return Some(found);
            }
        }
    } else if item.is_array() || item.is_array_of_tables() {
        let mut elements = (0..).map_while(|i| item.get(i)).enumerate();
        let found = elements.find_map(|(i, el)| key_at(el, at, &format!("{path}[{i}]")));
        if found.is_some() {
            return found;
        }
    }
    holds(item.span()).then(|| path.to_owned())
}

/// Byte offset of a dotted key (`routes[1].upstream`) in the document; when the key is not
/// written (a default), of the nearest table on its way.
pub(super) fn locate(doc: &ImDocument<&str>, key: &str) -> Option<usize> {
    let mut item = doc.as_item();
    let mut found = None;
    for segment in key.split('.') {
        let (name, index) = match segment.split_once('[') {
            Some((name, index)) => (name, index.trim_end_matches(']').parse::<usize>().ok()),
            None => (segment, None),
        };
        let Some((k, child)) = item.as_table_like().and_then(|t| t.get_key_value(name)) else {
            break;
        };
        found = k.span().or_else(|| child.span()).or(found);
        item = child;
        if let Some(index) = index {
            let Some(element) = item.get(index) else {
                break;
            };
            found = element.span().or(found);
            item = element;
        }
    }
    found.map(|span| span.start)
}

pub(super) fn line_at(src: &str, at: usize) -> usize {
    let before = &src.as_bytes()[..at.min(src.len())];
    before.iter().filter(|&&b| b == b'\n').count() + 1
}
