//! A candidate config: the file read (without blocking), parsed, validated, checked for
//! targets that are this proxy's own frontends, and hashed. Start-up, every reload and
//! `flyproxy check` load a file through [`load`], so all three accept and refuse the same files
//! with the same messages.
//!
//! It lives in the frontend because the loop check needs `backends`, a level above `config`.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::config::{self, sha256, Config, ConfigError, Problem};

/// A config file that passed every check, with what was read.
#[derive(Debug)]
pub struct Candidate {
    pub config: Config,
    /// The file's bytes as read: the watch compares later reads with them.
    pub bytes: Vec<u8>,
    /// The SHA-256 of `bytes`: the file's identity as a fleet sees it (`sha256sum` of the
    /// file, or of the value in etcd).
    pub sha256: String,
}

/// Why a file is not a candidate.
#[derive(Debug)]
pub enum LoadError {
    /// The file could not be read (missing, not a regular file, too large). Boxed: a
    /// `Problem` is large beside the other variant.
    Unreadable {
        path: PathBuf,
        problem: Box<Problem>,
    },
    /// The file was read but is not a config the proxy accepts. What was read is kept: a
    /// reload remembers it (a file is not looked at again until it changes) and names it by
    /// its hash when it says what it refused.
    Invalid {
        error: ConfigError,
        bytes: Vec<u8>,
        sha256: String,
    },
}

impl LoadError {
    /// Every problem, with the file it was found in (one for an unreadable file).
    pub fn into_config_error(self) -> ConfigError {
        match self {
            LoadError::Unreadable { path, problem } => ConfigError {
                path,
                problems: vec![*problem],
            },
            LoadError::Invalid { error, .. } => error,
        }
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Unreadable { path, problem } => write!(f, "{}: {problem}", path.display()),
            LoadError::Invalid { error, .. } => write!(f, "{error}"),
        }
    }
}

impl std::error::Error for LoadError {}

/// Read the config file at `path` and check it as the proxy would before serving it.
pub fn load(path: &Path) -> Result<Candidate, LoadError> {
    let bytes = config::read_file(path).map_err(|problem| LoadError::Unreadable {
        path: path.to_owned(),
        problem: Box::new(problem),
    })?;
    let sha256 = sha256::hex(&bytes);
    match Config::parse(path, &bytes).and_then(|c| without_loops(path, c)) {
        Ok(config) => Ok(Candidate {
            config,
            bytes,
            sha256,
        }),
        Err(error) => Err(LoadError::Invalid {
            error,
            bytes,
            sha256,
        }),
    }
}

/// `config`, unless some of its targets are this proxy's own frontends. The check needs no
/// mode: see `backends::loops`.
fn without_loops(path: &Path, config: Config) -> Result<Config, ConfigError> {
    let problems = crate::backends::loops::problems(&config);
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError {
            path: path.to_owned(),
            problems,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, contents: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("flyproxy-candidate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn a_good_file_is_a_candidate_with_its_hash() {
        let text = r#"{"Apps":[{"Name":"a","Ports":[7001],"Targets":["10.0.0.1:80"]}]}"#;
        let path = file("good.json", text);
        let c = load(&path).unwrap();
        assert_eq!(c.config.apps.len(), 1);
        assert_eq!(c.bytes, text.as_bytes());
        assert_eq!(c.sha256, sha256::hex(text.as_bytes()));
    }

    #[test]
    fn a_missing_file_is_unreadable() {
        let path = std::env::temp_dir().join("flyproxy-candidate-does-not-exist.json");
        let e = load(&path).unwrap_err();
        assert!(matches!(e, LoadError::Unreadable { .. }), "{e:?}");
        assert_eq!(e.into_config_error().problems.len(), 1);
    }

    #[test]
    fn a_target_that_is_our_own_frontend_is_refused_with_what_was_read() {
        let text = r#"{"Apps":[{"Name":"a","Ports":[7002],"Targets":["127.0.0.1:7002"]}]}"#;
        let path = file("loop.json", text);
        match load(&path) {
            Err(LoadError::Invalid { error, sha256, .. }) => {
                assert_eq!(sha256, sha256::hex(text.as_bytes()));
                assert!(!error.problems.is_empty());
            }
            other => panic!("expected a loop to be refused, got {:?}", other.err()),
        }
    }
}
