//! How the HTTP/2 plane's caller opens connections: plain TCP to `http://`
//! workers, or mutual TLS to `https://` ones. A caller with TLS settings
//! refuses plaintext workers, and one without them cannot reach TLS
//! workers: the mesh does not fall back silently either way.

use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Connects to workers, with TLS when the mesh has it.
#[derive(Clone)]
pub(super) struct MeshConnector {
    http: HttpConnector,
    tls: Option<TlsConnector>,
}

impl MeshConnector {
    pub(super) fn new(mut http: HttpConnector, tls: Option<TlsConnector>) -> Self {
        // The scheme is checked below, against the TLS settings.
        http.enforce_http(false);
        Self { http, tls }
    }
}

impl tower::Service<hyper::Uri> for MeshConnector {
    type Response = MeshIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<MeshIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        let tls = self.tls.clone();
        let https = uri.scheme_str() == Some("https");
        let host = uri.host().unwrap_or_default().trim_matches(['[', ']']).to_string();
        let connecting = self.http.call(uri.clone());
        Box::pin(async move {
            match (tls, https) {
                (None, false) => Ok(MeshIo::Plain(connecting.await?)),
                (Some(tls), true) => {
                    let name = ServerName::try_from(host)?;
                    let socket = connecting.await?.into_inner();
                    Ok(MeshIo::Tls(Box::new(TokioIo::new(tls.connect(name, socket).await?))))
                }
                (Some(_), false) => Err(format!(
                    "refusing to call the plaintext worker {uri}: mutual TLS is on (DYN_REQUEST_PLANE_TLS_*)"
                )
                .into()),
                (None, true) => Err(format!(
                    "the worker {uri} requires mutual TLS; set DYN_REQUEST_PLANE_TLS_CA_PATH/_CERT_PATH/_KEY_PATH"
                )
                .into()),
            }
        })
    }
}

/// One connection to a worker, plain or TLS.
pub(super) enum MeshIo {
    Plain(TokioIo<TcpStream>),
    /// Boxed: a TLS session is a kilobyte of state, a socket a few words.
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

impl Connection for MeshIo {
    fn connected(&self) -> Connected {
        match self {
            Self::Plain(io) => io.connected(),
            Self::Tls(io) => io.inner().get_ref().0.connected(),
        }
    }
}

impl hyper::rt::Read for MeshIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Self::Tls(io) => Pin::new(&mut **io).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for MeshIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Self::Tls(io) => Pin::new(&mut **io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_flush(cx),
            Self::Tls(io) => Pin::new(&mut **io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Self::Tls(io) => Pin::new(&mut **io).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(io) => io.is_write_vectored(),
            Self::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Self::Tls(io) => Pin::new(&mut **io).poll_write_vectored(cx, bufs),
        }
    }
}
