//! A file that is not JSON: where (line and column, for `PATH:LINE:COL:`) and a hint for the
//! slips people make when they write JSON by hand (a comment, single quotes, a trailing comma,
//! an empty file, a file saved in another encoding or with a byte order mark).

use crate::config::problem::Syntax;

/// The file's bytes are not UTF-8 or it is empty: what to say, before serde_json is asked.
pub(super) fn precheck(bytes: &[u8]) -> Option<Syntax> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Some(Syntax {
            message: "the file is empty".to_owned(),
            line: 1,
            column: 1,
            hint: Some(r#"a config is an object: {"Apps": [...]}"#),
        });
    }
    // Editors on Windows save one by default; serde_json says only "expected value".
    if bytes.starts_with(b"\xef\xbb\xbf") {
        return Some(Syntax {
            message: "the file starts with a byte order mark".to_owned(),
            line: 1,
            column: 1,
            hint: Some("save the file as UTF-8 without a BOM"),
        });
    }
    let bad = std::str::from_utf8(bytes).err()?.valid_up_to();
    let (line, column) = position(&bytes[..bad]);
    Some(Syntax {
        message: format!("byte 0x{:02x} is not UTF-8", bytes[bad]),
        line,
        column,
        hint: Some("save the file as UTF-8"),
    })
}

/// serde_json's error, with a hint where the text at its position shows a common slip.
pub(super) fn from_serde(bytes: &[u8], e: &serde_json::Error) -> Syntax {
    let (line, column) = (e.line(), e.column());
    let text = e.to_string();
    let suffix = format!(" at line {line} column {column}");
    let message = text.strip_suffix(&suffix).unwrap_or(&text).to_owned();
    let hint = if message.starts_with("trailing comma") {
        Some("remove the comma after the last entry")
    } else if message.starts_with("recursion limit") {
        Some("a config nests at most 128 lists and objects deep")
    } else if message.starts_with("EOF") {
        Some("the file ends before every { and [ is closed")
    } else {
        hint_at(bytes, line, column)
    };
    Syntax {
        message,
        line,
        column,
        hint,
    }
}

/// A hint from the byte serde_json stopped at (`column` is 1-based and counts bytes).
fn hint_at(bytes: &[u8], line: usize, column: usize) -> Option<&'static str> {
    let start = bytes
        .split(|&b| b == b'\n')
        .take(line.saturating_sub(1))
        .map(|l| l.len() + 1)
        .sum::<usize>();
    let at = start + column.saturating_sub(1);
    // serde_json stops on the offending byte or just past it: look at both.
    let near = &bytes[at.saturating_sub(1).min(bytes.len())..(at + 1).min(bytes.len())];
    if near.contains(&b'/') || near.contains(&b'#') {
        Some("JSON has no comments: remove them")
    } else if near.contains(&b'\'') {
        Some("JSON strings take double quotes: write \"text\", not 'text'")
    } else {
        None
    }
}

/// The line and column (both from 1) just after `read`.
fn position(read: &[u8]) -> (usize, usize) {
    let line = 1 + read.iter().filter(|&&b| b == b'\n').count();
    let column = 1 + read.iter().rev().take_while(|&&b| b != b'\n').count();
    (line, column)
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::path::Path;

    /// `bytes` as a config file: its problems as printed, one a line.
    fn refused(bytes: &[u8]) -> String {
        Config::parse(Path::new("c.json"), bytes)
            .unwrap_err()
            .to_string()
    }

    /// Each slip, with the position and the hint it gets.
    #[test]
    fn syntax_errors_say_where_and_hint_at_the_slip() {
        let cases = [
            ("", "c.json:1:1: not a valid config: the file is empty"),
            ("  \n", "c.json:1:1: not a valid config: the file is empty"),
            (
                "\u{feff}{\"Apps\": []}",
                "c.json:1:1: not a valid config: the file starts with a byte order mark (save",
            ),
            (
                "{\n  // web\n  \"Apps\": []}",
                "c.json:2:3: not a valid config: key must be a string (JSON has no comments",
            ),
            (
                "{'Apps': []}",
                "c.json:1:2: not a valid config: key must be a string (JSON strings take double quotes",
            ),
            (
                "{\"Apps\": [1, 2,]}",
                "(remove the comma after the last entry)",
            ),
            ("{\"Apps\": [", "(the file ends before every { and [ is closed)"),
            (&format!("{{\"Apps\": [{{\"Ports\": {}", "[".repeat(200)), "(a config nests at most 128"),
        ];
        for (text, want) in cases {
            let errs = refused(text.as_bytes());
            assert_eq!(errs.lines().count(), 1, "{text:?}: {errs}");
            assert!(errs.contains(want), "{text:?}: {want:?} not in {errs:?}");
        }
    }

    #[test]
    fn bytes_that_are_not_utf8_are_named_with_their_position() {
        let errs = refused(b"{\n \"Apps\": [\"\xff\"]}");
        assert_eq!(
            errs,
            "c.json:2:12: not a valid config: byte 0xff is not UTF-8 (save the file as UTF-8)"
        );
    }
}
