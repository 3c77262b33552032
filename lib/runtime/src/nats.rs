//! Connecting to NATS: the one place a client's options are built from
//! [`NatsConfig`], shared by the NATS request plane and the NATS event plane.
//! It knows nothing of what travels over the connection.

use crate::config::{NatsAuth, NatsConfig};
use std::path::PathBuf;
use std::time::Duration;

/// Deadline for reaching a NATS server: a process whose NATS is down fails
/// its start-up (or the first use of a NATS plane) instead of hanging.
pub(crate) const NATS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to the servers of `config` (`NATS_SERVER`) with its credentials.
pub(crate) async fn connect(config: &NatsConfig) -> Result<async_nats::Client, NatsConnectError> {
    // For logs and errors: no credentials a URL may carry.
    let servers = crate::config::redact_urls(config.servers());
    let options = options(config).await?;
    let client = tokio::time::timeout(NATS_CONNECT_TIMEOUT, options.connect(config.servers().as_slice()))
        .await
        .map_err(|_| NatsConnectError::Timeout {
            servers: servers.clone(),
            after: NATS_CONNECT_TIMEOUT,
        })?
        .map_err(|source| NatsConnectError::Unreachable {
            servers: servers.clone(),
            source,
        })?;
    tracing::info!(servers, "connected to NATS");
    Ok(client)
}

/// A client of `config`'s servers that connects in the background, trying
/// again until a server answers: for a process that serves without NATS
/// while it is down (the event plane). Fails only on settings (an
/// unreadable credentials file, servers that do not parse).
pub(crate) async fn connect_in_background(config: &NatsConfig) -> Result<async_nats::Client, NatsConnectError> {
    let servers = crate::config::redact_urls(config.servers());
    let options = options(config).await?.retry_on_initial_connect();
    options
        .connect(config.servers().as_slice())
        .await
        .map_err(|source| NatsConnectError::Unreachable { servers, source })
}

/// The client options of `config`: its credentials, a bounded connect attempt.
async fn options(config: &NatsConfig) -> Result<async_nats::ConnectOptions, NatsConnectError> {
    let options = async_nats::ConnectOptions::new().connection_timeout(NATS_CONNECT_TIMEOUT);
    let options = match config.auth() {
        NatsAuth::None => options,
        NatsAuth::UserPassword(user, password) => options.user_and_password(user.clone(), password.clone()),
        NatsAuth::Token(token) => options.token(token.clone()),
        NatsAuth::CredentialsFile(path) => {
            options
                .credentials_file(path)
                .await
                .map_err(|source| NatsConnectError::CredentialsFile {
                    path: path.clone(),
                    source,
                })?
        }
    };
    Ok(options)
}

impl NatsConnectError {
    /// True when no server answered (down, not there yet, not resolvable):
    /// what waiting may cure. Refused credentials and bad settings are not.
    pub fn is_unreachable(&self) -> bool {
        use async_nats::ConnectErrorKind as Kind;
        match self {
            NatsConnectError::Timeout { .. } => true,
            NatsConnectError::Unreachable { source, .. } => {
                matches!(
                    source.kind(),
                    Kind::Io | Kind::TimedOut | Kind::Dns | Kind::MaxReconnects
                )
            }
            NatsConnectError::CredentialsFile { .. } => false,
        }
    }
}

/// Why no NATS connection could be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsConnectError {
    #[error("cannot read NATS_AUTH_CREDENTIALS_FILE {}", path.display())]
    CredentialsFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach NATS at {servers} (NATS_SERVER): no answer within {after:?}")]
    Timeout { servers: String, after: Duration },
    #[error("cannot reach NATS at {servers} (NATS_SERVER)")]
    Unreachable {
        servers: String,
        #[source]
        source: async_nats::ConnectError,
    },
}
