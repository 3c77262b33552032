//! Attacks on mutual TLS, run against every TLS-capable transport (tcp,
//! http): a peer without a certificate from the mesh CA cannot connect,
//! whichever side it is on, and the legitimate peers keep working. The
//! ordinary behaviour over TLS is the conformance suite run through
//! [`MutualTls`](super::conformance::MutualTls).

use super::conformance::{DEADLINE, Fixtures, INSTANCE, PlaneKit, collect, numbers, test_mesh, tls_vars};
use super::{RequestClient, RequestServer, Target};
use crate::config::RuntimeConfig;
use crate::engine::Context;
use crate::error::{ErrorKind, RequestError};
use bytes::Bytes;
use std::path::Path;
use std::sync::Arc;
use switchyard_test_support::etcd_server::TestCertificates;
use tokio_util::sync::CancellationToken;

/// A second CA, unrelated to the mesh's, with certificates of its own.
fn other_ca() -> &'static TestCertificates {
    static OTHER: std::sync::OnceLock<TestCertificates> = std::sync::OnceLock::new();
    OTHER.get_or_init(TestCertificates::generate)
}

/// Settings trusting `ca`, presenting `cert`/`key`.
fn config(ca: &Path, cert: &Path, key: &Path) -> RuntimeConfig {
    let vars = tls_vars(ca, cert, key);
    RuntimeConfig::from_vars(vars.iter().map(|(k, v)| (*k, v.as_str()))).unwrap()
}

fn mesh_config() -> RuntimeConfig {
    let mesh = test_mesh();
    config(&mesh.ca, &mesh.server_cert, &mesh.server_key)
}

async fn server(kit: &dyn PlaneKit, config: RuntimeConfig) -> Arc<dyn RequestServer> {
    kit.server(config, Fixtures::default().handlers(), CancellationToken::new())
        .await
}

/// A three-item stream from `server` through `client`, or the error.
async fn count(client: &dyn RequestClient, server: &dyn RequestServer) -> Result<Vec<String>, RequestError> {
    let target = Target {
        transport: server.transport(),
        endpoint: "ns/c/count".into(),
        instance_id: INSTANCE,
    };
    let request = Context::new(Bytes::from_static(b"3"));
    let stream = tokio::time::timeout(DEADLINE, client.call(&target, request))
        .await
        .expect("a refused call fails within the deadline")?;
    match collect(stream).await {
        (items, None) => Ok(items),
        (_, Some(error)) => Err(error),
    }
}

/// Whether `error` is a connection refused, not an answer from the handler.
fn refused(error: &RequestError) -> bool {
    matches!(
        error.kind(),
        ErrorKind::Unreachable | ErrorKind::Disconnected | ErrorKind::Protocol
    )
}

pub(crate) async fn a_caller_with_a_certificate_from_another_ca_is_refused(kit: &dyn PlaneKit) {
    let (mesh, other) = (test_mesh(), other_ca());
    let worker = server(kit, mesh_config()).await;
    // The intruder trusts the mesh CA, so only the worker's check can stop it.
    let intruder = kit
        .client(config(&mesh.ca, &other.server_cert, &other.server_key))
        .await;
    let error = count(&*intruder, &*worker).await.unwrap_err();
    assert!(refused(&error), "{error}");
    let member = kit.client(mesh_config()).await;
    assert_eq!(count(&*member, &*worker).await.unwrap(), numbers(3));
}

pub(crate) async fn a_worker_with_a_certificate_from_another_ca_is_refused(kit: &dyn PlaneKit) {
    let (mesh, other) = (test_mesh(), other_ca());
    // The rogue worker trusts the mesh CA, so only the caller's check can stop it.
    let rogue = server(kit, config(&mesh.ca, &other.server_cert, &other.server_key)).await;
    let member = kit.client(mesh_config()).await;
    let error = count(&*member, &*rogue).await.unwrap_err();
    assert!(refused(&error), "{error}");
    let worker = server(kit, mesh_config()).await;
    assert_eq!(count(&*member, &*worker).await.unwrap(), numbers(3));
}

pub(crate) async fn a_caller_without_a_certificate_is_refused(kit: &dyn PlaneKit) {
    let worker = server(kit, mesh_config()).await;
    // It speaks TLS and trusts the mesh CA, but has no certificate to show.
    let anonymous = RuntimeConfig::default()
        .with_request_plane_tls(Some(super::conformance::test_mesh_tls().without_client_certificate()));
    let anonymous = kit.client(anonymous).await;
    let error = count(&*anonymous, &*worker).await.unwrap_err();
    assert!(refused(&error), "{error}");
    let member = kit.client(mesh_config()).await;
    assert_eq!(count(&*member, &*worker).await.unwrap(), numbers(3));
}

pub(crate) async fn a_plaintext_caller_is_refused(kit: &dyn PlaneKit) {
    let worker = server(kit, mesh_config()).await;
    let plaintext = kit.client(RuntimeConfig::default()).await;
    let error = count(&*plaintext, &*worker).await.unwrap_err();
    assert!(refused(&error), "{error}");
    let member = kit.client(mesh_config()).await;
    assert_eq!(count(&*member, &*worker).await.unwrap(), numbers(3));
}

pub(crate) async fn a_caller_with_tls_does_not_fall_back_to_a_plaintext_worker(kit: &dyn PlaneKit) {
    let plaintext = server(kit, RuntimeConfig::default()).await;
    let member = kit.client(mesh_config()).await;
    let error = count(&*member, &*plaintext).await.unwrap_err();
    assert!(refused(&error), "{error}");
}

/// Runs the suite against a transport's [`PlaneKit`].
macro_rules! mutual_tls_tests {
    ($kit:expr) => {
        #[tokio::test]
        async fn a_caller_with_a_certificate_from_another_ca_is_refused() {
            $crate::request_plane::tls_suite::a_caller_with_a_certificate_from_another_ca_is_refused(&$kit).await;
        }
        #[tokio::test]
        async fn a_worker_with_a_certificate_from_another_ca_is_refused() {
            $crate::request_plane::tls_suite::a_worker_with_a_certificate_from_another_ca_is_refused(&$kit).await;
        }
        #[tokio::test]
        async fn a_caller_without_a_certificate_is_refused() {
            $crate::request_plane::tls_suite::a_caller_without_a_certificate_is_refused(&$kit).await;
        }
        #[tokio::test]
        async fn a_plaintext_caller_is_refused() {
            $crate::request_plane::tls_suite::a_plaintext_caller_is_refused(&$kit).await;
        }
        #[tokio::test]
        async fn a_caller_with_tls_does_not_fall_back_to_a_plaintext_worker() {
            $crate::request_plane::tls_suite::a_caller_with_tls_does_not_fall_back_to_a_plaintext_worker(&$kit).await;
        }
    };
}
pub(crate) use mutual_tls_tests;
