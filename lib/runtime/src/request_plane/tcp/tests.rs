//! The TCP transport: the shared conformance suite, plus what only TCP
//! has (one multiplexed connection per worker, frames, connect errors).

use super::{TcpClient, TcpServer};
use crate::config::RuntimeConfig;
use crate::engine::Context;
use crate::error::ErrorKind;
use crate::metrics::TransportMetrics;
use crate::request_plane::conformance::{DEADLINE, INSTANCE, Pair, PlaneKit, collect, conformance_tests, numbers};
use crate::request_plane::handlers::Handlers;
use crate::request_plane::{RequestClient, RequestServer, Target, Transport};
use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(crate) struct Tcp;

impl PlaneKit for Tcp {
    fn server(
        &self,
        config: RuntimeConfig,
        handlers: Arc<Handlers>,
        stop: CancellationToken,
    ) -> BoxFuture<'static, Arc<dyn RequestServer>> {
        async move {
            let server = TcpServer::bind(
                config.tcp(),
                handlers,
                TransportMetrics::unregistered(),
                stop,
                TaskTracker::new(),
            )
            .await
            .unwrap();
            Arc::new(server) as Arc<dyn RequestServer>
        }
        .boxed()
    }

    fn client(&self, config: RuntimeConfig) -> BoxFuture<'static, Arc<dyn RequestClient>> {
        async move {
            Arc::new(TcpClient::new(
                config.tcp(),
                CancellationToken::new(),
                TaskTracker::new(),
            )) as Arc<dyn RequestClient>
        }
        .boxed()
    }
}

conformance_tests!(Tcp);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_to_a_worker_shares_one_connection_even_after_failures() {
    let config = RuntimeConfig::from_vars([("DYN_TCP_MAX_MESSAGE_SIZE", "4096")]).unwrap();
    let handlers = crate::request_plane::conformance::Fixtures::default().handlers();
    let server = TcpServer::bind(
        config.tcp(),
        handlers,
        TransportMetrics::unregistered(),
        CancellationToken::new(),
        TaskTracker::new(),
    )
    .await
    .unwrap();
    let client = TcpClient::new(
        RuntimeConfig::default().tcp(),
        CancellationToken::new(),
        TaskTracker::new(),
    );
    let target = |endpoint: &str| Target {
        transport: server.transport(),
        endpoint: format!("ns/c/{endpoint}"),
        instance_id: INSTANCE,
    };
    let calls = (0..1000).map(|i| {
        let (client, target) = (&client, target("count"));
        async move {
            let request = Context::new(Bytes::from(format!("{},1", 3 + i % 5)));
            collect(client.call(&target, request).await.unwrap()).await
        }
    });
    for (items, error) in futures::future::join_all(calls).await {
        assert!(error.is_none() && !items.is_empty());
    }
    // An oversized request and an oversized response fail only their streams.
    let big = client
        .call(&target("echo"), Context::new(Bytes::from(vec![b'z'; 8000])))
        .await
        .unwrap();
    assert_eq!(collect(big).await.1.unwrap().kind(), ErrorKind::TooLarge);
    let huge = client
        .call(&target("big"), Context::new(Bytes::from_static(b"5000")))
        .await
        .unwrap();
    assert_eq!(collect(huge).await.1.unwrap().kind(), ErrorKind::TooLarge);
    let (items, _) = collect(
        client
            .call(&target("count"), Context::new(Bytes::from_static(b"3")))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(items, numbers(3));
    assert_eq!(server.connections_accepted(), 1);
}

#[tokio::test]
async fn a_corrupt_frame_closes_only_its_own_connection() {
    let pair = Pair::start(&Tcp).await;
    let healthy = pair.call("count", "3,50").await.unwrap();
    let Transport::Tcp(address) = pair.server.transport() else {
        unreachable!("a TCP server")
    };
    let mut rogue = tokio::net::TcpStream::connect(&address).await.unwrap();
    rogue
        .write_all(&[0, 0, 0, 1, 0xff, 0, 0, 0, 0, 0, 0, 0, 1, 0])
        .await
        .unwrap();
    let mut rest = vec![];
    let closed = tokio::time::timeout(DEADLINE, rogue.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the worker kept a corrupt connection open");
    assert_eq!(collect(healthy).await.0, numbers(3));
}

#[tokio::test]
async fn an_unreachable_worker_fails_fast_with_unreachable() {
    let client_config = RuntimeConfig::from_vars([("DYN_TCP_CONNECT_TIMEOUT", "2s")]).unwrap();
    let client = TcpClient::new(client_config.tcp(), CancellationToken::new(), TaskTracker::new());
    // Bind then drop a listener to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let target = Target {
        transport: Transport::Tcp(format!("127.0.0.1:{port}")),
        endpoint: "ns/c/echo".into(),
        instance_id: INSTANCE,
    };
    let error = client.call(&target, Context::new(Bytes::new())).await.err().unwrap();
    assert_eq!(error.kind(), ErrorKind::Unreachable);
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_at_the_connect_timeout() {
    let pair = Pair::with_limits(&Tcp, &[("DYN_TCP_CONNECT_TIMEOUT", "200ms")], &[]).await;
    let Transport::Tcp(address) = pair.server.transport() else {
        unreachable!("a TCP server")
    };
    let mut silent = tokio::net::TcpStream::connect(&address).await.unwrap();
    let mut rest = vec![];
    let closed = tokio::time::timeout(DEADLINE, silent.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the worker kept a silent connection open");

    // A caller that talks is not affected, however long it then stays idle.
    let answer = pair.call("count", "2,0").await.unwrap();
    assert_eq!(collect(answer).await.0, numbers(2));
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let answer = pair.call("count", "3,0").await.unwrap();
    assert_eq!(collect(answer).await.0, numbers(3));
}
