//! A request's query string (`?app=NAME&refresh=N`), read from text the client chose: the
//! request head is already capped (8 KiB), parameters the endpoint does not know are ignored
//! (as they always were: a scrape config's extra `params` must not turn a working scrape into
//! an error), and a parameter it knows is taken only when its value is well formed.

use std::fmt;

/// What a query asks for besides the path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Query {
    /// One app's series or status (`app=NAME`, percent-decoded); None: all, bounded.
    pub app: Option<String>,
}

/// Why a query was refused (answered 400 with this text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum QueryError {
    /// `app=` given more than once.
    Repeated,
    /// `app=` with nothing after it.
    Empty,
    /// A `%` not followed by two hex digits, or bytes that are not UTF-8 once decoded.
    Encoding,
}

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueryError::Repeated => write!(f, "app= given more than once: ask for one app"),
            QueryError::Empty => write!(f, "app= needs an app name (app=NAME)"),
            QueryError::Encoding => write!(
                f,
                "app=: bad percent-encoding (each % must be followed by two hex digits, and the name must be UTF-8)"
            ),
        }
    }
}

/// The parameters of `query` (the part after `?`, without it).
pub(super) fn parse(query: &str) -> Result<Query, QueryError> {
    let mut q = Query::default();
    for kv in query.split('&') {
        let Some(v) = kv.strip_prefix("app=") else {
            continue;
        };
        if q.app.is_some() {
            return Err(QueryError::Repeated);
        }
        let name = decode(v)?;
        if name.is_empty() {
            return Err(QueryError::Empty);
        }
        q.app = Some(name);
    }
    Ok(q)
}

/// `%XX` decoded (`+` stays itself: no app name has a space, and one with a `+` is not
/// confused with one without).
fn decode(v: &str) -> Result<String, QueryError> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            let (Some(hi), Some(lo)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(QueryError::Encoding);
            };
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| QueryError::Encoding)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(q: &str) -> Result<Option<String>, QueryError> {
        parse(q).map(|q| q.app)
    }

    #[test]
    fn app_names_decoded_and_checked() {
        assert_eq!(app(""), Ok(None));
        assert_eq!(app("refresh=2&x=y"), Ok(None));
        assert_eq!(app("app=web"), Ok(Some("web".into())));
        assert_eq!(app("refresh=2&app=w%65b-1.x"), Ok(Some("web-1.x".into())));
        assert_eq!(app("app=a+b"), Ok(Some("a+b".into())));
        assert_eq!(app("app=%C3%A9"), Ok(Some("é".into())));
        assert_eq!(app("app=web&app=shop"), Err(QueryError::Repeated));
        assert_eq!(app("app="), Err(QueryError::Empty));
        assert_eq!(app("app=%"), Err(QueryError::Encoding));
        assert_eq!(app("app=%4"), Err(QueryError::Encoding));
        assert_eq!(app("app=%zz"), Err(QueryError::Encoding));
        assert_eq!(app("app=%FF"), Err(QueryError::Encoding));
    }
}
