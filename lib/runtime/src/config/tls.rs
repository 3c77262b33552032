//! TLS settings, read and checked once when the settings are loaded: mutual
//! TLS for the request planes (`DYN_REQUEST_PLANE_TLS_CA_PATH`, `_CERT_PATH`,
//! `_KEY_PATH`) into one rustls server and one client configuration, and the
//! NATS client's TLS (`NATS_AUTH_CA`, `NATS_AUTH_CLIENT_CERT`,
//! `NATS_AUTH_CLIENT_KEY`). All use the ring provider, named explicitly, so
//! that no process-wide default provider is needed. Nothing here does
//! network I/O.

use super::ConfigError;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The mesh's TLS identity and trust: who this process is, and which CA its
/// peers must be signed by. Cheap to clone.
#[derive(Clone)]
pub struct RequestPlaneTls {
    ca: PathBuf,
    cert: PathBuf,
    /// Accepts only callers with a certificate from the CA.
    server: Arc<ServerConfig>,
    /// Presents this process's certificate; accepts only workers whose
    /// certificate is from the CA and names the address dialled.
    client: Arc<ClientConfig>,
}

impl std::fmt::Debug for RequestPlaneTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestPlaneTls")
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

/// A TLS file that cannot be used, named with its variable.
fn bad_file(variable: &'static str, path: &Path, reason: impl std::fmt::Display) -> ConfigError {
    ConfigError::TlsFile {
        variable,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Every certificate in the PEM file `path` (at least one).
fn read_certificates(variable: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let chain: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| bad_file(variable, path, format!("cannot read PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err(bad_file(variable, path, "holds no PEM `CERTIFICATE` block"));
    }
    Ok(chain)
}

/// The CA certificate(s) in `path` as trust anchors.
fn read_roots(variable: &'static str, path: &Path) -> Result<RootCertStore, ConfigError> {
    let mut roots = RootCertStore::empty();
    for anchor in read_certificates(variable, path)? {
        roots
            .add(anchor)
            .map_err(|e| bad_file(variable, path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// The private key in the PEM file `path`.
fn read_key(variable: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, ConfigError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        bad_file(
            variable,
            path,
            format!("cannot read a PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
        )
    })
}

impl RequestPlaneTls {
    /// Reads the CA, certificate chain and key. `variables` names the three
    /// settings in that order, for the errors.
    pub(super) fn load(variables: [&'static str; 3], ca: &Path, cert: &Path, key: &Path) -> Result<Self, ConfigError> {
        let [ca_var, cert_var, key_var] = variables;
        let roots = Arc::new(read_roots(ca_var, ca)?);
        let chain = read_certificates(cert_var, cert)?;
        let key_der = read_key(key_var, key)?;
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let mismatch = |e: tokio_rustls::rustls::Error| {
            bad_file(
                key_var,
                key,
                format!(
                    "the key and the certificate in {} do not make a usable identity: {e}",
                    cert.display()
                ),
            )
        };
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| bad_file(ca_var, ca, format!("cannot verify clients with this CA: {e}")))?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(mismatch)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key_der.clone_key())
            .map_err(mismatch)?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(mismatch)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key_der)
            .map_err(mismatch)?;
        Ok(Self {
            ca: ca.to_path_buf(),
            cert: cert.to_path_buf(),
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    /// The server side: requires a client certificate from the CA.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// The client side: presents this process's certificate.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    /// The same trust, but a caller that presents no certificate: what a
    /// TLS client outside the mesh looks like (tests attack with it).
    #[cfg(test)]
    pub(crate) fn without_client_certificate(&self) -> Self {
        let mut roots = RootCertStore::empty();
        for anchor in CertificateDer::pem_file_iter(&self.ca).expect("the CA was read once already") {
            roots.add(anchor.expect("a valid CA")).expect("a usable CA");
        }
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Self {
            client: Arc::new(client),
            ..self.clone()
        }
    }
}

/// TLS to the NATS servers: which CA signs them, and the certificate this
/// process presents when they ask for one (`verify: true`). Cheap to clone.
#[derive(Clone)]
pub struct NatsTls {
    ca: PathBuf,
    cert: Option<PathBuf>,
    client: Arc<ClientConfig>,
}

impl std::fmt::Debug for NatsTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsTls")
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

impl NatsTls {
    /// Reads the CA and, when given, the client certificate and key.
    /// `variables` names the three settings (CA, certificate, key) for the errors.
    pub(super) fn load(
        variables: [&'static str; 3],
        ca: &Path,
        identity: Option<(&Path, &Path)>,
    ) -> Result<Self, ConfigError> {
        let [ca_var, cert_var, key_var] = variables;
        let roots = read_roots(ca_var, ca)?;
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad_file(ca_var, ca, e))?
            .with_root_certificates(roots);
        let client = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = read_certificates(cert_var, cert)?;
                let key_der = read_key(key_var, key)?;
                builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                    bad_file(
                        key_var,
                        key,
                        format!(
                            "the key and the certificate in {} do not make a usable identity: {e}",
                            cert.display()
                        ),
                    )
                })?
            }
        };
        Ok(Self {
            ca: ca.to_path_buf(),
            cert: identity.map(|(cert, _)| cert.to_path_buf()),
            client: Arc::new(client),
        })
    }

    /// The client configuration for async-nats.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }
}

/// A short, stable name for the peer behind `certificate`, for logs: its
/// first URI subject-alternative name (a SPIFFE id), else its first DNS
/// name, else the SHA-256 fingerprint of the certificate.
pub fn peer_identity(certificate: &CertificateDer<'_>) -> String {
    if let Ok(cert) = webpki::EndEntityCert::try_from(certificate) {
        if let Some(uri) = cert.valid_uri_names().next() {
            return uri.to_string();
        }
        if let Some(dns) = cert.valid_dns_names().next() {
            return dns.to_string();
        }
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(certificate.as_ref());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}
