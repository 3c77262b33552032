//! The NATS settings (`NATS_SERVER`, `NATS_AUTH_*`): servers, how this
//! process authenticates, and TLS. Parsed and checked once with the other
//! settings; nothing here connects.

use super::variables::*;
use super::{ConfigError, NatsTls, Settings, redact_urls};
use derive_getters::Getters;
use std::path::{Path, PathBuf};

/// How to authenticate to NATS.
#[derive(Clone)]
pub enum NatsAuth {
    None,
    UserPassword(String, String),
    Token(String),
    CredentialsFile(PathBuf),
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        match self {
            Self::None => f.write_str("None"),
            Self::UserPassword(user, _) => write!(f, "UserPassword({user:?}, ***)"),
            Self::Token(_) => f.write_str("Token(***)"),
            Self::CredentialsFile(path) => write!(f, "CredentialsFile({path:?})"),
        }
    }
}

/// How to reach NATS.
#[derive(Clone, Getters)]
pub struct NatsConfig {
    servers: Vec<String>,
    auth: NatsAuth,
    /// TLS with the given CA (and client certificate); `None` leaves it to
    /// the URL and the server (`tls://`, or a server that requires TLS,
    /// verified against the system's roots).
    tls: Option<NatsTls>,
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            .field("servers", &redact_urls(&self.servers))
            .field("auth", &self.auth)
            .field("tls", &self.tls)
            .finish()
    }
}

impl Settings {
    pub(super) fn nats(&self) -> Result<NatsConfig, ConfigError> {
        let text = self.text(NATS_SERVER)?;
        let servers: Vec<String> = text
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        let valid = |s: &String| {
            s.strip_prefix("nats://")
                .or_else(|| s.strip_prefix("tls://"))
                .is_some_and(|rest| !rest.is_empty())
        };
        if servers.is_empty() || !servers.iter().all(valid) {
            return Err(self.invalid(
                NATS_SERVER,
                &redact_urls(&servers),
                "a comma-separated list of nats://host:port or tls://host:port URLs",
            ));
        }
        let user = self.optional_text(NATS_AUTH_USERNAME)?;
        let password = self.optional_text(NATS_AUTH_PASSWORD)?;
        let token = self.optional_text(NATS_AUTH_TOKEN)?;
        let credentials = self.optional_text(NATS_AUTH_CREDENTIALS_FILE)?;
        let auth = match (user, password, token, credentials) {
            (None, None, None, None) => NatsAuth::None,
            (Some(user), Some(password), None, None) => NatsAuth::UserPassword(user, password),
            (None, None, Some(token), None) => NatsAuth::Token(token),
            (None, None, None, Some(path)) => NatsAuth::CredentialsFile(PathBuf::from(path)),
            (Some(_), None, _, _) | (None, Some(_), _, _) => {
                return Err(ConfigError::Incomplete {
                    set: "only one of NATS_AUTH_USERNAME and NATS_AUTH_PASSWORD",
                    needed: "both, or neither",
                });
            }
            _ => {
                return Err(ConfigError::Incomplete {
                    set: "more than one NATS authentication method",
                    needed: "exactly one of user+password, NATS_AUTH_TOKEN or NATS_AUTH_CREDENTIALS_FILE",
                });
            }
        };
        Ok(NatsConfig {
            servers,
            auth,
            tls: self.nats_tls()?,
        })
    }

    /// `NATS_AUTH_CA`, with `NATS_AUTH_CLIENT_CERT` and `NATS_AUTH_CLIENT_KEY`
    /// (both or neither) when the servers verify clients.
    fn nats_tls(&self) -> Result<Option<NatsTls>, ConfigError> {
        let ca = self.optional_text(NATS_AUTH_CA)?;
        let identity = match (
            self.optional_text(NATS_AUTH_CLIENT_CERT)?,
            self.optional_text(NATS_AUTH_CLIENT_KEY)?,
        ) {
            (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Incomplete {
                    set: "only one of NATS_AUTH_CLIENT_CERT and NATS_AUTH_CLIENT_KEY",
                    needed: "both, or neither",
                });
            }
        };
        let Some(ca) = ca else {
            // The client certificate is checked against nothing we were told
            // to trust: refused rather than sent to any server.
            return match identity {
                None => Ok(None),
                Some(_) => Err(ConfigError::Incomplete {
                    set: "NATS_AUTH_CLIENT_CERT and NATS_AUTH_CLIENT_KEY",
                    needed: "NATS_AUTH_CA (the CA of the NATS servers)",
                }),
            };
        };
        let identity = identity.as_ref().map(|(cert, key)| (cert.as_path(), key.as_path()));
        NatsTls::load(
            [NATS_AUTH_CA, NATS_AUTH_CLIENT_CERT, NATS_AUTH_CLIENT_KEY],
            Path::new(&ca),
            identity,
        )
        .map(Some)
    }
}
