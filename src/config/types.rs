//! JSON types checked field by field: a value of the wrong type is a problem that names the
//! app and the field, shows what was written and says what to write instead, and checking goes
//! on. (serde's derive would stop at the first, naming neither.)

use serde_json::Value;

use crate::config::problem::{Problem, Problems};
use crate::config::raw::Found;

/// Longest excerpt of a wrong value quoted in a message: enough to recognise it, short enough
/// that a 64 MiB string cannot make a 64 MiB line.
const SHOWN_MAX: usize = 40;

/// JSON `null` is the same as leaving the key out (as it always was).
pub(super) fn present(v: Option<Value>) -> Option<Value> {
    v.filter(|v| !v.is_null())
}

impl Found {
    pub(super) fn of(v: Value) -> Found {
        match v {
            Value::Array(_) => Found::List,
            Value::Object(_) => Found::Object,
            other => Found::Scalar(other),
        }
    }

    /// What it is, for "... is a string".
    fn kind(&self) -> &'static str {
        match self {
            Found::List => "a list",
            Found::Object => "an object",
            Found::Scalar(Value::String(_)) => "a string",
            Found::Scalar(Value::Number(_)) => "a number",
            Found::Scalar(Value::Bool(_)) => "a boolean",
            // Null is taken for absent before a type is checked; lists and objects are not
            // scalars. Named anyway rather than assumed away.
            Found::Scalar(_) => "null",
        }
    }

    /// The value as written, cut to `SHOWN_MAX` characters.
    fn shown(&self) -> String {
        match self {
            Found::List => "[...]".to_owned(),
            Found::Object => "{...}".to_owned(),
            Found::Scalar(v) => {
                let s = v.to_string();
                match s.char_indices().nth(SHOWN_MAX) {
                    Some((cut, _)) => format!("{}...", &s[..cut]),
                    None => s,
                }
            }
        }
    }

    /// The scalar as it would read inside a string (a number or true/false), if it is one.
    fn as_text(&self) -> Option<String> {
        match self {
            Found::Scalar(Value::String(s)) => Some(s.clone()),
            Found::Scalar(v @ (Value::Number(_) | Value::Bool(_))) => Some(v.to_string()),
            _ => None,
        }
    }
}

/// The problem "`field` of `app` (None: the top level) is `found`; write `write`".
pub(super) fn wrong(app: Option<&str>, field: &str, found: &Found, write: String) -> Problem {
    Problem::WrongType {
        app: app.map(str::to_owned),
        field: field.to_owned(),
        found: found.shown(),
        kind: found.kind(),
        write,
    }
}

/// The fields of one app (or the top level when `app` is None), checked for their types.
pub(super) struct Typed<'a> {
    pub(super) app: Option<&'a str>,
    pub(super) problems: &'a mut Problems,
}

impl Typed<'_> {
    fn push(&mut self, field: &str, found: &Found, write: String) {
        let p = wrong(self.app, field, found, write);
        self.problems.push(p);
    }

    /// A string; `example` is what to write when the value cannot simply be quoted.
    pub(super) fn string(
        &mut self,
        field: &str,
        v: Option<Value>,
        example: &str,
    ) -> Option<String> {
        match present(v)? {
            Value::String(s) => Some(s),
            other => {
                let found = Found::of(other);
                let write = match found.as_text() {
                    Some(t) => format!("{:?}", t),
                    None => example.to_owned(),
                };
                self.push(field, &found, write);
                None
            }
        }
    }

    /// The problem "`field` is missing or empty".
    pub(super) fn missing(&mut self, field: &'static str) {
        let app = self.app.unwrap_or_default().to_owned();
        self.problems.push(Problem::Missing { app, field });
    }

    /// A list of strings that was given: its entries that are strings. An empty list is the
    /// problem "missing or empty"; each entry that is not a string is a problem of its own
    /// (and left out); a value that is not a list is one problem. `each` says what one entry
    /// is, for the messages.
    pub(super) fn nonempty_strings(
        &mut self,
        field: &'static str,
        v: Value,
        each: &str,
    ) -> Vec<String> {
        let list = match v {
            Value::Array(list) if list.is_empty() => {
                self.missing(field);
                return Vec::new();
            }
            Value::Array(list) => list,
            other => {
                let found = Found::of(other);
                let write = match &found {
                    Found::Scalar(Value::String(s)) => format!("[{s:?}]"),
                    _ => format!("a list, each entry {each}"),
                };
                self.push(field, &found, write);
                return Vec::new();
            }
        };
        let mut out = Vec::with_capacity(list.len());
        for entry in list {
            match entry {
                Value::String(s) => out.push(s),
                other => {
                    let found = Found::of(other);
                    let write = match found.as_text() {
                        Some(t) => format!("{t:?}"),
                        None => each.to_owned(),
                    };
                    self.push(field, &found, write);
                }
            }
        }
        out
    }

    /// A list of anything (the entries are checked by the caller); None (and a problem) if
    /// it is not a list.
    pub(super) fn list(&mut self, field: &str, v: Value, example: &str) -> Option<Vec<Value>> {
        match v {
            Value::Array(list) => Some(list),
            other => {
                let found = Found::of(other);
                // A lone value that would do as the list's one entry: suggest the list of it.
                let write = match &found {
                    Found::Scalar(Value::Number(n)) => format!("[{n}]"),
                    Found::Scalar(Value::String(s)) => match s.trim().parse::<i64>() {
                        Ok(n) => format!("[{n}]"),
                        Err(_) if s.contains('-') => format!("[{s:?}]"),
                        Err(_) => example.to_owned(),
                    },
                    _ => example.to_owned(),
                };
                self.push(field, &found, write);
                None
            }
        }
    }

    /// A whole number; `expected` says which (`a number from 1 to 10`, the numbers in
    /// `range`). A number that is not whole or too large for any field is returned as its text
    /// for the range message. A string holding a number in `range` is told to lose its quotes.
    pub(super) fn int(
        &mut self,
        field: &str,
        v: Option<Value>,
        range: std::ops::RangeInclusive<i64>,
        expected: &str,
    ) -> Option<Result<i64, String>> {
        match present(v)? {
            Value::Number(n) => Some(n.as_i64().ok_or_else(|| n.to_string())),
            other => {
                let found = Found::of(other);
                let write = match &found {
                    Found::Scalar(Value::String(s))
                        if s.trim().parse::<i64>().is_ok_and(|n| range.contains(&n)) =>
                    {
                        s.trim().to_owned()
                    }
                    _ => expected.to_owned(),
                };
                self.push(field, &found, write);
                None
            }
        }
    }
}
