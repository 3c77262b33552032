//! What a handler implements ([`AsyncEngine`]) and what travels with each
//! request ([`Context`], [`Controller`]): the request id and the cancellation
//! signals shared by the caller, the request plane and the handler.
//!
//! This module does no I/O; the request plane carries `stop`/`kill` between
//! the caller's controller and the worker's.

use crate::error::RequestError;
use futures::Stream;
use std::pin::Pin;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// A stream of responses for one request. It ends after the last item, or
/// after the first `Err` (an error is always the last item).
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, RequestError>> + Send>>;

/// A streaming request handler: one request in, a stream of responses out.
///
/// The contract:
/// - `generate` returns quickly with a stream (or an error when the request is
///   refused outright, e.g. [`crate::error::ErrorKind::Invalid`] or
///   [`crate::error::ErrorKind::Overloaded`]); the work happens as the stream
///   is polled.
/// - The handler watches [`Controller::stopped`]: on `stop` it should finish
///   gracefully (end the stream soon); on `kill` the runtime stops polling the
///   stream and drops it, so the handler's resources are released.
/// - An `Err` item ends the stream; it reaches the caller with its kind.
///
/// ```ignore
/// struct Echo;
/// #[async_trait::async_trait]
/// impl AsyncEngine<String, String> for Echo {
///     async fn generate(&self, request: Context<String>) -> Result<ResponseStream<String>, RequestError> {
///         let (text, _controller) = request.into_parts();
///         let chars: Vec<_> = text.chars().map(|c| Ok(c.to_string())).collect();
///         Ok(Box::pin(futures::stream::iter(chars)))
///     }
/// }
/// ```
#[async_trait::async_trait]
pub trait AsyncEngine<Req, Resp>: Send + Sync + 'static {
    async fn generate(&self, request: Context<Req>) -> Result<ResponseStream<Resp>, RequestError>;
}

/// The cancellation state of one request, shared by everyone who works on it.
///
/// `stop` asks for a graceful end (the handler finishes what it is doing);
/// `kill` ends the request now. A killed request also counts as stopped.
#[derive(Debug, Clone)]
pub struct Controller {
    inner: Arc<ControllerInner>,
}

#[derive(Debug)]
struct ControllerInner {
    id: String,
    /// Cancelled by `kill`; the parent of `stop`, so a kill is also a stop.
    kill: CancellationToken,
    /// Cancelled by `stop` (or by `kill` through the parent link).
    stop: CancellationToken,
}

impl Controller {
    /// A live controller with a fresh random request id.
    pub fn new() -> Self {
        Self::with_id(new_request_id())
    }

    /// A live controller for an existing request id (the worker side reuses
    /// the caller's id so logs on both sides line up).
    pub fn with_id(id: impl Into<String>) -> Self {
        Self::with_kill(id.into(), CancellationToken::new())
    }

    /// A controller that is killed when `parent` is cancelled (used by the
    /// request plane to kill in-flight work when the process shuts down).
    pub(crate) fn with_parent(id: impl Into<String>, parent: &CancellationToken) -> Self {
        Self::with_kill(id.into(), parent.child_token())
    }

    fn with_kill(id: String, kill: CancellationToken) -> Self {
        let stop = kill.child_token();
        Self {
            inner: Arc::new(ControllerInner { id, kill, stop }),
        }
    }

    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Asks for a graceful end of the request.
    pub fn stop(&self) {
        self.inner.stop.cancel();
    }

    /// Ends the request now.
    pub fn kill(&self) {
        self.inner.kill.cancel();
    }

    /// True after `stop` or `kill`.
    pub fn is_stopped(&self) -> bool {
        self.inner.stop.is_cancelled()
    }

    /// True after `kill`.
    pub fn is_killed(&self) -> bool {
        self.inner.kill.is_cancelled()
    }

    /// Resolves once the request is stopped or killed.
    pub async fn stopped(&self) {
        self.inner.stop.cancelled().await
    }

    /// Resolves once the request is killed.
    pub async fn killed(&self) {
        self.inner.kill.cancelled().await
    }

    pub(crate) fn stop_token(&self) -> &CancellationToken {
        &self.inner.stop
    }

    pub(crate) fn kill_token(&self) -> &CancellationToken {
        &self.inner.kill
    }
}

impl Default for Controller {
    fn default() -> Self {
        Self::new()
    }
}

/// A request payload together with its [`Controller`].
#[derive(Debug)]
pub struct Context<T> {
    data: T,
    controller: Controller,
}

impl<T> Context<T> {
    /// Wraps `data` with a fresh controller (random request id).
    pub fn new(data: T) -> Self {
        Self::with_controller(data, Controller::new())
    }

    /// Wraps `data` with an existing controller; keep a clone of it to stop
    /// or kill the request later.
    pub fn with_controller(data: T, controller: Controller) -> Self {
        Self { data, controller }
    }

    pub fn id(&self) -> &str {
        self.controller.id()
    }

    pub fn data(&self) -> &T {
        &self.data
    }

    pub fn controller(&self) -> &Controller {
        &self.controller
    }

    pub fn into_parts(self) -> (T, Controller) {
        (self.data, self.controller)
    }

    /// Replaces the payload, keeping the same request id and controller.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Context<U> {
        Context {
            data: f(self.data),
            controller: self.controller,
        }
    }
}

impl<T> From<T> for Context<T> {
    fn from(data: T) -> Self {
        Context::new(data)
    }
}

/// 128 random bits as 32 hex digits: unique enough to correlate logs, cheap
/// enough to make for every request.
fn new_request_id() -> String {
    hex_id(rand::random())
}

/// `bits` as 32 lowercase hex digits, as `format!("{:032x}")` writes them,
/// digit by digit: `format!` took about 1 % of a caller's CPU per request
/// in the cross-process bench.
fn hex_id(bits: u128) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(32);
    for shift in (0..32).rev().map(|digit| digit * 4) {
        id.push(char::from(DIGITS[(bits >> shift) as usize & 0xf]));
    }
    id
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_request_id_is_its_128_bits_as_32_hex_digits() {
        for bits in [0, 1, 0xabc, u128::MAX, 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210] {
            assert_eq!(super::hex_id(bits), format!("{bits:032x}"));
        }
        assert_ne!(super::new_request_id(), super::new_request_id());
    }

    use super::*;

    #[test]
    fn kill_implies_stop_but_stop_does_not_imply_kill() {
        let stopped = Controller::new();
        stopped.stop();
        assert!(stopped.is_stopped());
        assert!(!stopped.is_killed());

        let killed = Controller::new();
        killed.kill();
        assert!(killed.is_stopped());
        assert!(killed.is_killed());
    }

    #[test]
    fn cancelling_the_parent_kills_the_request() {
        let parent = CancellationToken::new();
        let controller = Controller::with_parent("r1", &parent);
        parent.cancel();
        assert!(controller.is_killed());
        assert_eq!(controller.id(), "r1");
    }

    #[test]
    fn request_ids_are_distinct() {
        assert_ne!(Controller::new().id(), Controller::new().id());
    }
}
