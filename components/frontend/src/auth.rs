//! API keys at the edge: with keys configured, every OpenAI route needs
//! `Authorization: Bearer <key>`; `/live` and `/health` stay open so probes
//! need no secret, and `/metrics` follows [`MetricsAccess`].
//!
//! Keys are kept only as SHA-256 digests, looked up by digest, so the
//! process holds no key in the clear after start-up and a lookup's timing
//! says nothing about how much of a guessed key was right. A key is known
//! to the rest of the frontend by its [`KeyId`]: its position in the
//! configuration, never its text.

use crate::error::ApiError;
use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Which configured key a request came with (its index: flags first, then
/// the file's lines), or `ANONYMOUS` when no keys are configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub usize);

impl KeyId {
    /// The caller of a frontend that has no keys.
    pub const ANONYMOUS: KeyId = KeyId(usize::MAX);
}

/// Who may read `/metrics` on the OpenAI port (`--http-metrics`). The
/// status server's own port (`DYN_SYSTEM_PORT`) always serves it openly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum MetricsAccess {
    /// Anyone.
    Open,
    /// Callers with an API key (anyone when no keys are configured).
    #[default]
    Key,
    /// Nobody: scrape the status port instead.
    Off,
}

/// The configured keys, by digest.
#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Arc<HashMap<[u8; 32], KeyId>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys").field("keys", &self.digests.len()).finish()
    }
}

/// Why the configured keys cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the API key file {path} (--api-key-file)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("API key {which} is not usable: {problem}; a key is 8 to 256 printable ASCII characters without spaces")]
    Malformed { which: String, problem: &'static str },
    #[error("--api-key-file {path} holds no key (one key per line; `#` starts a comment)")]
    EmptyFile { path: PathBuf },
}

/// Shortest key accepted: a key anyone can guess protects nothing.
const MIN_KEY_LEN: usize = 8;
const MAX_KEY_LEN: usize = 256;

fn check_key(key: &str, which: impl FnOnce() -> String) -> Result<(), KeyError> {
    let problem = if key.len() < MIN_KEY_LEN {
        Some("it is shorter than 8 characters")
    } else if key.len() > MAX_KEY_LEN {
        Some("it is longer than 256 characters")
    } else if !key.bytes().all(|b| b.is_ascii_graphic()) {
        Some("it holds a space, a control character or non-ASCII text")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(KeyError::Malformed {
            which: which(),
            problem,
        }),
        None => Ok(()),
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl ApiKeys {
    /// The keys of `--api-key` (each) and `--api-key-file` (one per line;
    /// blank lines and lines starting with `#` are skipped). No keys at
    /// all: the frontend is open, as before.
    pub fn load(flags: &[String], file: Option<&Path>) -> Result<Self, KeyError> {
        let mut keys: Vec<([u8; 32], KeyId)> = Vec::new();
        for (n, key) in flags.iter().enumerate() {
            check_key(key, || format!("number {} of --api-key", n + 1))?;
            keys.push((digest(key), KeyId(keys.len())));
        }
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let before = keys.len();
            for (n, line) in text.lines().enumerate() {
                let key = line.trim();
                if key.is_empty() || key.starts_with('#') {
                    continue;
                }
                check_key(key, || format!("on line {} of {}", n + 1, path.display()))?;
                keys.push((digest(key), KeyId(keys.len())));
            }
            if keys.len() == before {
                return Err(KeyError::EmptyFile {
                    path: path.to_path_buf(),
                });
            }
        }
        // A key given twice keeps its first id.
        let mut digests = HashMap::new();
        for (digest, id) in keys {
            digests.entry(digest).or_insert(id);
        }
        Ok(Self {
            digests: Arc::new(digests),
        })
    }

    /// Whether any key is configured (otherwise every request is let in).
    pub fn enabled(&self) -> bool {
        !self.digests.is_empty()
    }

    /// Every distinct key's id, for per-key state sized at start-up.
    pub fn ids(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.digests.values().copied()
    }

    /// The key a request carries, or OpenAI's 401.
    pub fn check(&self, headers: &HeaderMap) -> Result<KeyId, ApiError> {
        if !self.enabled() {
            return Ok(KeyId::ANONYMOUS);
        }
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::unauthorized(
                "no API key provided; send it as `Authorization: Bearer <key>`",
            ));
        };
        let key = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        let Some(key) = key else {
            return Err(ApiError::unauthorized(
                "the Authorization header must be `Bearer <key>`",
            ));
        };
        self.digests
            .get(&digest(key))
            .copied()
            .ok_or_else(|| ApiError::unauthorized("incorrect API key provided"))
    }
}

#[cfg(test)]
mod tests {
    use super::{ApiKeys, KeyError, KeyId};
    use axum::http::{HeaderMap, HeaderValue, header};

    fn bearer(key: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {key}")).unwrap(),
        );
        headers
    }

    #[test]
    fn keys_come_from_flags_and_file_and_only_they_pass() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "# operators\nfile-key-0001\n\n  file-key-0002  \n").unwrap();
        let keys = ApiKeys::load(&["flag-key-0001".into()], Some(file.path())).unwrap();
        assert!(keys.enabled());
        assert_eq!(keys.check(&bearer("flag-key-0001")).unwrap(), KeyId(0));
        assert_eq!(keys.check(&bearer("file-key-0002")).unwrap(), KeyId(2));
        let wrong = keys.check(&bearer("file-key-0003")).unwrap_err();
        assert_eq!(wrong.status, 401);
        assert_eq!(wrong.code, "invalid_api_key");
        assert!(keys.check(&HeaderMap::new()).unwrap_err().message.contains("Bearer"));
        let mut basic = HeaderMap::new();
        basic.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic Zm9vOmJhcg=="));
        assert!(keys.check(&basic).is_err());
        assert!(!format!("{keys:?}").contains("flag-key"), "Debug never shows a key");
    }

    #[test]
    fn no_keys_lets_everyone_in() {
        let keys = ApiKeys::load(&[], None).unwrap();
        assert!(!keys.enabled());
        assert_eq!(keys.check(&HeaderMap::new()).unwrap(), KeyId::ANONYMOUS);
    }

    #[test]
    fn bad_keys_and_files_are_refused_with_where_they_are() {
        let short = ApiKeys::load(&["abc".into()], None).unwrap_err();
        assert!(short.to_string().contains("number 1 of --api-key"), "{short}");
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "good-key-0001\nhas a space in it\n").unwrap();
        let spaced = ApiKeys::load(&[], Some(file.path())).unwrap_err();
        assert!(spaced.to_string().contains("line 2"), "{spaced}");
        std::fs::write(file.path(), "# nothing\n\n").unwrap();
        assert!(matches!(
            ApiKeys::load(&[], Some(file.path())).unwrap_err(),
            KeyError::EmptyFile { .. }
        ));
        let missing = ApiKeys::load(&[], Some(std::path::Path::new("/nonexistent/keys"))).unwrap_err();
        assert!(matches!(missing, KeyError::Read { .. }));
    }
}
