//! [`PushRouter`]: sends typed requests to the instances a [`Client`] knows,
//! chosen by a [`RouterMode`], and decodes the typed response stream.

use super::{Policy, Random, RoundRobin, RouterMode};
use crate::component::Instance;
use crate::component::client::Client;
use crate::engine::{AsyncEngine, Context, ResponseStream};
use crate::error::{ErrorKind, RequestError};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::marker::PhantomData;

/// Routes requests of type `Req` to an endpoint's instances and yields `Resp`s.
#[derive(Debug)]
pub struct PushRouter<Req, Resp> {
    client: Client,
    mode: RouterMode,
    round_robin: RoundRobin,
    types: PhantomData<fn(Req) -> Resp>,
}

impl<Req, Resp> PushRouter<Req, Resp>
where
    Req: Serialize + Send + 'static,
    Resp: DeserializeOwned + Send + 'static,
{
    /// A router over `client`'s instances. Async so that routers which
    /// subscribe to load reports can do so before the first request.
    pub async fn from_client(client: Client, mode: RouterMode) -> Result<Self, RequestError> {
        Ok(Self {
            client,
            mode,
            round_robin: RoundRobin::default(),
            types: PhantomData,
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn mode(&self) -> RouterMode {
        self.mode
    }

    /// Sends `request` to the instance the router's mode picks.
    pub async fn generate(&self, request: Context<Req>) -> Result<ResponseStream<Resp>, RequestError> {
        match self.mode {
            RouterMode::RoundRobin => self.round_robin(request).await,
            RouterMode::Random => self.random(request).await,
            RouterMode::Direct => Err(RequestError::new(
                ErrorKind::Invalid,
                "this router is in direct mode: call direct(request, instance_id)",
            )),
        }
    }

    /// Sends `request` to the next instance in turn.
    pub async fn round_robin(&self, request: Context<Req>) -> Result<ResponseStream<Resp>, RequestError> {
        self.select_and_send(&self.round_robin, request).await
    }

    /// Sends `request` to a random instance.
    pub async fn random(&self, request: Context<Req>) -> Result<ResponseStream<Resp>, RequestError> {
        self.select_and_send(&Random, request).await
    }

    /// Sends `request` to the instance `instance_id`, which must be registered.
    pub async fn direct(&self, request: Context<Req>, instance_id: u64) -> Result<ResponseStream<Resp>, RequestError> {
        let instances = self.client.instances();
        let found = instances
            .binary_search_by_key(&instance_id, |i| i.instance_id)
            .map_err(|_| {
                RequestError::new(
                    ErrorKind::NotFound,
                    format!(
                        "instance {instance_id:x} of {} is not registered",
                        self.client.endpoint().path()
                    ),
                )
            })?;
        self.send(&instances[found], request).await
    }

    async fn select_and_send(
        &self,
        policy: &dyn Policy,
        request: Context<Req>,
    ) -> Result<ResponseStream<Resp>, RequestError> {
        let instances = self.client.instances();
        let chosen = policy.select(&instances).ok_or_else(|| {
            RequestError::new(
                ErrorKind::NotFound,
                format!("no instances of {} are registered", self.client.endpoint().path()),
            )
        })?;
        self.send(&instances[chosen], request).await
    }

    async fn send(&self, instance: &Instance, request: Context<Req>) -> Result<ResponseStream<Resp>, RequestError> {
        let (data, controller) = request.into_parts();
        let body = rmp_serde::to_vec_named(&data)
            .map_err(|e| RequestError::new(ErrorKind::Invalid, format!("cannot encode the request as msgpack: {e}")))?;
        let request = Context::with_controller(Bytes::from(body), controller);
        let client = self.client.endpoint().drt().request_client();
        let responses = client.call(&instance.target(), request).await?;
        let decoded = responses.map(|item| {
            item.and_then(|bytes| {
                rmp_serde::from_slice::<Resp>(&bytes).map_err(|e| {
                    RequestError::new(
                        ErrorKind::Protocol,
                        format!("cannot decode a response as {}: {e}", std::any::type_name::<Resp>()),
                    )
                })
            })
        });
        // An error is always the last item: a decode failure ends the stream
        // (dropping the wire stream kills the request on the worker).
        Ok(Box::pin(decoded.scan(false, |failed, item| {
            let next = (!*failed).then(|| {
                *failed = item.is_err();
                item
            });
            futures::future::ready(next)
        })))
    }
}

/// A router is itself an engine: it can be the handler of another endpoint.
#[async_trait::async_trait]
impl<Req, Resp> AsyncEngine<Req, Resp> for PushRouter<Req, Resp>
where
    Req: Serialize + Send + 'static,
    Resp: DeserializeOwned + Send + 'static,
{
    async fn generate(&self, request: Context<Req>) -> Result<ResponseStream<Resp>, RequestError> {
        PushRouter::generate(self, request).await
    }
}
