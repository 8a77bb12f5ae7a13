//! Owns the request's fields as the phases read them: the header map of a request hyper read
//! (HTTP/2, HTTP/1.0, what kaproxy's own HTTP/1.1 loop hands over), or the fields of a head
//! the own loop parsed, read where they lie in its bytes — no map built for them (README,
//! "HTTP/1.1 data path"). Both read the same: names in any case, values as bytes, a repeated
//! `Content-Length` (equal: the framing refused others) once, as hyper keeps it.

use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;

use crate::http1::head::{Fields, Name};

/// A request's fields, from a map or a parsed head.
#[derive(Clone, Copy)]
pub struct RequestFields<'a> {
    source: Source<'a>,
    /// `Expect` is left out: kaproxy answered it (a body was read), the backend gets the body
    /// without being asked (as behind nginx).
    no_expect: bool,
}

#[derive(Clone, Copy)]
enum Source<'a> {
    Map(&'a HeaderMap),
    Parsed(&'a Fields),
}

impl<'a> RequestFields<'a> {
    pub fn map(map: &'a HeaderMap) -> Self {
        RequestFields {
            source: Source::Map(map),
            no_expect: false,
        }
    }

    pub fn parsed(fields: &'a Fields) -> Self {
        RequestFields {
            source: Source::Parsed(fields),
            no_expect: false,
        }
    }

    /// These fields without `Expect`.
    pub fn without_expect(self) -> Self {
        RequestFields {
            no_expect: true,
            ..self
        }
    }

    /// Every field as (name, value), in order (a map's in its order).
    pub fn iter(self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        self.entries().map(|(_, n, v)| (n, v))
    }

    /// Every field as (which name, name, value), in order: a parsed head's names were told
    /// apart when it was parsed, a map's are told apart here.
    pub fn entries(self) -> impl Iterator<Item = (Name, &'a [u8], &'a [u8])> + 'a {
        let no_expect = self.no_expect;
        let all = match self.source {
            Source::Map(map) => Either::Left(map.iter().map(|(n, v)| {
                let n = n.as_str().as_bytes();
                (Name::of(n), n, v.as_bytes())
            })),
            Source::Parsed(fields) => {
                let mut length_seen = false;
                Either::Right(fields.entries().filter(move |(known, _, _)| {
                    !(*known == Name::ContentLength && std::mem::replace(&mut length_seen, true))
                }))
            }
        };
        all.filter(move |(_, n, _)| !(no_expect && n.eq_ignore_ascii_case(b"expect")))
    }

    /// The values of every field named `name` (a `HeaderName`: lower-case), in order.
    pub fn values<'n>(self, name: &'n HeaderName) -> impl Iterator<Item = &'a [u8]> + 'n
    where
        'a: 'n,
    {
        match self.source {
            Source::Map(map) => Either::Left(map.get_all(name).iter().map(HeaderValue::as_bytes)),
            Source::Parsed(fields) => Either::Right(
                fields
                    .iter()
                    .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_str().as_bytes()))
                    .map(|(_, v)| v),
            ),
        }
    }

    /// Whether a field is named `name`.
    pub fn contains(self, name: &HeaderName) -> bool {
        self.values(name).next().is_some()
    }

    /// The first value of `name` as a header value (shared with the head's bytes).
    pub fn first(self, name: &HeaderName) -> Option<HeaderValue> {
        match self.source {
            Source::Map(map) => map.get(name).cloned(),
            Source::Parsed(fields) => {
                let value = self.values(name).next()?;
                HeaderValue::from_maybe_shared(fields.shared(value)).ok()
            }
        }
    }

    /// How many fields (each repeated one counted).
    pub fn len(self) -> usize {
        match self.source {
            Source::Map(map) => map.len(),
            Source::Parsed(fields) => fields.len(),
        }
    }

    pub fn is_empty(self) -> bool {
        self.len() == 0
    }

    /// The fields as a header map, as hyper's server would have made it (for what goes on
    /// through hyper: a tunnel's handshake).
    pub fn to_map(self) -> HeaderMap {
        let fields = match self.source {
            Source::Map(map) => return map.clone(),
            Source::Parsed(fields) => fields,
        };
        let mut map = HeaderMap::with_capacity(fields.len());
        for (name, value) in self.iter() {
            let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name),
                HeaderValue::from_maybe_shared(fields.shared(value)),
            ) else {
                continue;
            };
            map.append(name, value);
        }
        map
    }
}

/// One iterator or the other.
#[derive(Clone)]
enum Either<L, R> {
    Left(L),
    Right(R),
}

impl<L: Iterator, R: Iterator<Item = L::Item>> Iterator for Either<L, R> {
    type Item = L::Item;

    fn next(&mut self) -> Option<L::Item> {
        match self {
            Either::Left(l) => l.next(),
            Either::Right(r) => r.next(),
        }
    }
}
