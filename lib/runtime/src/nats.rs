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
        .map_err(|source| {
            if is_tls_failure(&source) {
                NatsConnectError::Tls {
                    servers: servers.clone(),
                    source,
                }
            } else {
                NatsConnectError::Unreachable {
                    servers: servers.clone(),
                    source,
                }
            }
        })?;
    tracing::info!(servers, "connected to NATS");
    Ok(client)
}

/// Whether `error` is TLS failing: a certificate refused by either side, or
/// a peer that does not speak TLS. async-nats reports most of these as I/O
/// errors, so look for rustls's error among the causes.
fn is_tls_failure(error: &async_nats::ConnectError) -> bool {
    use tokio_rustls::rustls::Error as TlsError;
    if error.kind() == async_nats::ConnectErrorKind::Tls {
        return true;
    }
    let mut cause = std::error::Error::source(error);
    while let Some(error) = cause {
        let io_inner = error
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .is_some_and(|inner| inner.is::<TlsError>());
        if error.is::<TlsError>() || io_inner {
            return true;
        }
        cause = error.source();
    }
    false
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

/// The client options of `config`: its credentials and TLS, a bounded
/// connect attempt.
async fn options(config: &NatsConfig) -> Result<async_nats::ConnectOptions, NatsConnectError> {
    let mut options = async_nats::ConnectOptions::new().connection_timeout(NATS_CONNECT_TIMEOUT);
    if let Some(tls) = config.tls() {
        // TLS is required, whatever the URL says: a server (or someone in
        // the middle) that does not offer it is refused, never spoken to in
        // plaintext.
        options = options
            .require_tls(true)
            .tls_client_config((*tls.client_config()).clone());
    }
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
            NatsConnectError::CredentialsFile { .. } | NatsConnectError::Tls { .. } => false,
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
    #[error(
        "TLS with NATS at {servers} failed: a certificate was refused (NATS_AUTH_CA must have signed the server's; \
         a server that verifies clients needs NATS_AUTH_CLIENT_CERT and NATS_AUTH_CLIENT_KEY from its CA), or the \
         server does not speak TLS, which NATS_AUTH_CA requires"
    )]
    Tls {
        servers: String,
        #[source]
        source: async_nats::ConnectError,
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

#[cfg(test)]
mod tests {
    //! TLS to NATS against a real `nats-server` that speaks only TLS and
    //! verifies clients (`verify: true`): who gets in and who does not.

    use super::*;
    use crate::config::RuntimeConfig;
    use crate::request_plane::conformance::test_mesh;
    use switchyard_test_support::etcd_server::TestCertificates;
    use switchyard_test_support::nats_server::NatsServer;

    /// The NATS settings of `vars` (paths as text).
    fn settings(vars: &[(&str, &str)]) -> NatsConfig {
        RuntimeConfig::from_vars(vars.iter().copied()).unwrap().nats().clone()
    }

    fn paths(certificates: &TestCertificates) -> [String; 3] {
        [&certificates.ca, &certificates.client_cert, &certificates.client_key].map(|p| p.display().to_string())
    }

    /// Connecting fails, promptly (a refusal, not a hang).
    async fn refused(config: &NatsConfig) -> NatsConnectError {
        tokio::time::timeout(NATS_CONNECT_TIMEOUT * 2, connect(config))
            .await
            .expect("a refusal within the connect deadline")
            .expect_err("the connection is refused")
    }

    #[tokio::test]
    async fn a_process_with_the_ca_and_a_client_certificate_talks_to_nats_over_tls() {
        let mesh = test_mesh();
        let server = NatsServer::start_with_mutual_tls(mesh, 1024 * 1024);
        let [ca, cert, key] = paths(mesh);
        let url = server.url();
        let config = settings(&[
            ("NATS_SERVER", &url),
            ("NATS_AUTH_CA", &ca),
            ("NATS_AUTH_CLIENT_CERT", &cert),
            ("NATS_AUTH_CLIENT_KEY", &key),
        ]);
        let client = connect(&config).await.unwrap();
        let mut subscriber = client.subscribe("tls.test").await.unwrap();
        client.publish("tls.test", "over tls".into()).await.unwrap();
        let message = tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut subscriber))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&message.payload[..], b"over tls");
        // The background connection (the event plane's) takes the same path.
        let background = connect_in_background(&config).await.unwrap();
        background.flush().await.unwrap();
    }

    #[tokio::test]
    async fn a_process_without_a_client_certificate_is_refused_by_nats() {
        let mesh = test_mesh();
        let server = NatsServer::start_with_mutual_tls(mesh, 1024 * 1024);
        let [ca, ..] = paths(mesh);
        let url = server.url();
        refused(&settings(&[("NATS_SERVER", &url), ("NATS_AUTH_CA", &ca)])).await;
        // Nor without any TLS settings (the system's roots do not know the CA).
        refused(&settings(&[("NATS_SERVER", &url)])).await;
    }

    #[tokio::test]
    async fn a_nats_server_with_a_certificate_from_another_ca_is_refused() {
        let mesh = test_mesh();
        let server = NatsServer::start_with_mutual_tls(mesh, 1024 * 1024);
        // A process of another mesh: its CA did not sign this server.
        let other = TestCertificates::generate();
        let [ca, cert, key] = paths(&other);
        let url = server.url();
        let error = refused(&settings(&[
            ("NATS_SERVER", &url),
            ("NATS_AUTH_CA", &ca),
            ("NATS_AUTH_CLIENT_CERT", &cert),
            ("NATS_AUTH_CLIENT_KEY", &key),
        ]))
        .await;
        assert!(matches!(error, NatsConnectError::Tls { .. }), "{error:?}");
        assert!(!error.is_unreachable(), "a TLS refusal is not an outage: {error:?}");
    }

    #[tokio::test]
    async fn a_process_with_nats_tls_settings_refuses_a_plaintext_server() {
        let mesh = test_mesh();
        let plaintext = NatsServer::start();
        let [ca, cert, key] = paths(mesh);
        let url = plaintext.url();
        let error = refused(&settings(&[
            ("NATS_SERVER", &url),
            ("NATS_AUTH_CA", &ca),
            ("NATS_AUTH_CLIENT_CERT", &cert),
            ("NATS_AUTH_CLIENT_KEY", &key),
        ]))
        .await;
        assert!(error.to_string().contains("TLS"), "{error}");
    }
}
