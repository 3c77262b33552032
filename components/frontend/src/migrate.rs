//! Migration in the frontend: a response stream that, when its worker dies,
//! leaves or stalls mid-answer, sends the request on to another worker with
//! what was generated so far ([`switchyard_llm::migration`]) and carries on,
//! so the client sees one uninterrupted answer.
//!
//! A stall is a worker that sends nothing for the stall timeout (a process
//! stopped or wedged without closing its connection): its stream is dropped
//! (which kills the request there) and treated like a broken connection.
//!
//! How the answer continues is what every worker of the model can do
//! ([`Continuation::common`] over the model cards' engine facts). When they
//! cannot continue it exactly, the client gets a clear error after the part
//! it has, never a spliced answer. A client can turn migration off for one
//! request with `x-switchyard-migration: off` ([`opted_out`]). A request
//! goes to at most `1 + --migration-limit` workers.

use crate::kv::Booking;
use crate::models::Model;
use futures::StreamExt;
use prometheus::IntCounterVec;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use switchyard_llm::migration::{Continuation, Progress, continue_request};
use switchyard_llm::model_card::ModelKind;
use switchyard_llm::openai::Usage;
use switchyard_llm::protocol::{LlmOutput, LlmRequest};
use switchyard_runtime::engine::{Context, Controller, ResponseStream};
use switchyard_runtime::error::{ErrorKind, RequestError};
use switchyard_runtime::routing::push_router::Routed;
use tokio::time::{Instant, Sleep};

/// Errors after which another worker can take over: the worker went away
/// (connection broken or refused), is shutting down, or went silent past a
/// deadline.
pub fn is_migratable(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::Disconnected | ErrorKind::Unreachable | ErrorKind::ShuttingDown | ErrorKind::TimedOut
    )
}

/// The request header with which a client turns migration off for its
/// request (`off`); any other value leaves it on.
pub const MIGRATION_HEADER: &str = "x-switchyard-migration";

/// Whether the client asked for no migration (`x-switchyard-migration: off`).
pub fn opted_out(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(MIGRATION_HEADER)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.trim().eq_ignore_ascii_case("off"))
}

/// What a migration needs besides the stream.
#[derive(Debug, Clone)]
pub struct MigrationPolicy {
    /// The model, whose router (and KV state, in KV mode) picks the next worker.
    pub target: Model,
    /// Migrations allowed per request (`--migration-limit`).
    pub limit: u32,
    pub request_id: String,
    /// `dynamo_frontend_model_migration_total{model, migration_type}`.
    pub counter: IntCounterVec,
    /// Longest silence from a worker before its stream counts as broken.
    pub stall_timeout: Option<Duration>,
    /// Where each new worker choice is recorded (the mesh page's decisions).
    pub decisions: crate::mesh::decisions::Decisions,
}

struct State {
    policy: MigrationPolicy,
    /// The client's request: every continuation is built from it and `progress`.
    original: Arc<LlmRequest>,
    current: ResponseStream<LlmOutput>,
    /// The instance `current` comes from.
    instance: u64,
    /// The instances this request broke on: a migration goes elsewhere
    /// while another instance is left, even after their ejection runs out
    /// (at most the migration limit's worth).
    broken: Vec<u64>,
    /// Whether `current` answers `original` itself (it reports the
    /// original prompt's token ids) rather than a continuation.
    current_is_original: bool,
    /// Everything generated so far, over all workers.
    progress: Progress,
    /// Tokens generated before the last migration (for the final usage).
    tokens_before: u32,
    migrations: u32,
    done: bool,
    /// The request's KV booking on its current worker (KV mode).
    booking: Option<Booking>,
    /// The stall deadline on `current` (`--stream-stall-timeout-secs`).
    stall: Option<StallWatch>,
}

/// A worker's stream that sends nothing for `limit` counts as broken.
///
/// One timer per request, moved on only when it fires and a piece came
/// since it was set, instead of a timer armed and cancelled around every
/// piece: at thousands of tokens a second that was a timer-wheel insert and
/// removal per token, for a deadline that almost never fires.
struct StallWatch {
    limit: Duration,
    last_piece: Instant,
    timer: Pin<Box<Sleep>>,
}

impl StallWatch {
    fn new(limit: Duration) -> Self {
        let now = Instant::now();
        Self {
            limit,
            last_piece: now,
            timer: Box::pin(tokio::time::sleep_until(now + limit)),
        }
    }

    /// Counts from now, as if a piece had just come.
    fn restart(&mut self) {
        self.last_piece = Instant::now();
    }

    /// The next item of `stream`, or `TimedOut` once it has been silent for `limit`.
    async fn next(&mut self, stream: &mut ResponseStream<LlmOutput>) -> Option<Result<LlmOutput, RequestError>> {
        loop {
            tokio::select! {
                biased;
                next = stream.next() => {
                    self.last_piece = Instant::now();
                    return next;
                }
                () = &mut self.timer => {
                    let deadline = self.last_piece + self.limit;
                    if Instant::now() >= deadline {
                        let limit = self.limit;
                        return Some(Err(RequestError::new(
                            ErrorKind::TimedOut,
                            format!("the worker sent nothing for {limit:?} (--stream-stall-timeout-secs)"),
                        )));
                    }
                    self.timer.as_mut().reset(deadline);
                }
            }
        }
    }
}

/// `responses`, continued on another worker when its worker fails mid-answer.
/// `booking` is the request's KV booking on `routed`'s worker: released as
/// the answer progresses, and replaced when the request moves.
pub fn migrating(
    policy: MigrationPolicy,
    request: Arc<LlmRequest>,
    routed: Routed<LlmOutput>,
    booking: Option<Booking>,
) -> ResponseStream<LlmOutput> {
    let stall = policy.stall_timeout.map(StallWatch::new);
    let state = State {
        policy,
        original: request,
        current: routed.stream,
        instance: routed.instance_id,
        broken: Vec::new(),
        current_is_original: true,
        progress: Progress::default(),
        tokens_before: 0,
        migrations: 0,
        done: false,
        booking,
        stall,
    };
    Box::pin(futures::stream::unfold(state, State::next))
}

impl State {
    async fn next(mut self) -> Option<(Result<LlmOutput, RequestError>, Self)> {
        if self.done {
            return None;
        }
        loop {
            let next = match &mut self.stall {
                None => self.current.next().await,
                Some(watch) => watch.next(&mut self.current).await,
            };
            match next {
                Some(Ok(mut piece)) => {
                    if let Some(booking) = &mut self.booking {
                        booking.first_token();
                    }
                    self.progress.record(&piece, self.current_is_original);
                    if let Some(usage) = piece.usage.as_mut() {
                        // The last worker counted the continued prompt; the
                        // client asked for the original one.
                        let before = self.tokens_before;
                        *usage = Usage::new(
                            usage.prompt_tokens.saturating_sub(before),
                            usage.completion_tokens + before,
                        );
                    }
                    if piece.finish_reason.is_some() {
                        self.done = true;
                    }
                    return Some((Ok(piece), self));
                }
                Some(Err(error)) if is_migratable(error.kind()) && self.migrations < self.policy.limit => {
                    if error.kind() != ErrorKind::ShuttingDown {
                        // Broken or stalled: keep new work away from it for a while.
                        self.policy.target.router.eject(self.instance, error.message());
                    }
                    self.broken.push(self.instance);
                    if let Err(error) = self.migrate_within_budget(error).await {
                        self.done = true;
                        return Some((Err(error), self));
                    }
                    // The new worker gets the whole stall timeout.
                    if let Some(watch) = &mut self.stall {
                        watch.restart();
                    }
                }
                Some(Err(error)) => {
                    self.done = true;
                    return Some((Err(error), self));
                }
                None => return None,
            }
        }
    }

    /// Migrates, and again while the budget lasts when the continued
    /// request reached no worker in time either (each one the router tried
    /// was silent or unreachable), as a new request does.
    async fn migrate_within_budget(&mut self, mut cause: RequestError) -> Result<(), RequestError> {
        loop {
            let before = self.migrations;
            match self.migrate(&cause).await {
                // Only a failed route used up a migration: the others
                // (the answer cannot continue) are final.
                Err(error)
                    if self.migrations > before
                        && is_migratable(error.kind())
                        && self.migrations < self.policy.limit =>
                {
                    cause = error;
                }
                done => return done,
            }
        }
    }

    /// Re-issues the rest of the request; on success `current` is the new stream.
    async fn migrate(&mut self, cause: &RequestError) -> Result<(), RequestError> {
        let kind = match *self.original {
            LlmRequest::Chat(_) => ModelKind::Chat,
            LlmRequest::Completion(_) => ModelKind::Completions,
        };
        let ways = Continuation::common(self.policy.target.cards.values(), kind);
        let next = match continue_request(&self.original, &self.progress, &ways) {
            Ok(Some(next)) => Arc::new(next),
            Ok(None) => return Err(cause.clone_kind()),
            Err(cannot) => {
                tracing::warn!(
                    request_id = %self.policy.request_id,
                    generated_tokens = self.progress.tokens,
                    %cause,
                    reason = %cannot,
                    "worker lost mid-answer; the answer cannot continue on another worker"
                );
                return Err(crate::error::for_client(
                    cause.kind(),
                    format!(
                        "the answer was cut off after {} tokens: its worker or engine broke off, and {cannot}",
                        self.progress.tokens
                    ),
                ));
            }
        };
        self.migrations += 1;
        let kind = if self.progress.is_empty() {
            "new_request"
        } else {
            "ongoing_request"
        };
        self.policy
            .counter
            .with_label_values(&[&self.policy.target.name, kind])
            .inc();
        tracing::info!(
            request_id = %self.policy.request_id,
            migration = self.migrations,
            generated_tokens = self.progress.tokens,
            %cause,
            "worker lost mid-answer; migrating the request"
        );
        // The old worker's share of the load goes now, not at the stream's end.
        self.booking = None;
        let controller = Controller::with_id(&self.policy.request_id);
        let (routed, kv_route) = self
            .policy
            .target
            .route(Context::with_controller(Arc::clone(&next), controller), &self.broken)
            .await?;
        crate::mesh::record(
            &self.policy.decisions,
            &self.policy.request_id,
            &self.policy.target,
            routed.instance_id,
            kv_route.as_ref(),
            self.migrations,
        );
        if let Some(route) = kv_route {
            tracing::debug!(request_id = %self.policy.request_id, route = %route.explanation, "KV route of the migrated request");
            self.booking = Some(route.booking);
        }
        self.current_is_original = *next == *self.original;
        self.tokens_before = self.progress.tokens;
        self.current = routed.stream;
        self.instance = routed.instance_id;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pieces `gaps` apart (each gap measured from the previous piece), then silence.
    fn paced(gaps: &[u64]) -> ResponseStream<LlmOutput> {
        let gaps: Vec<Duration> = gaps.iter().map(|&ms| Duration::from_millis(ms)).collect();
        let pieces = futures::stream::iter(gaps).then(|gap| async move {
            tokio::time::sleep(gap).await;
            Ok(LlmOutput::default())
        });
        Box::pin(pieces.chain(futures::stream::pending()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_slower_in_total_than_the_limit_but_never_silent_that_long_is_not_cut() {
        let mut watch = StallWatch::new(Duration::from_millis(300));
        let mut stream = paced(&[200, 250, 290, 100]);
        for _ in 0..4 {
            assert!(matches!(watch.next(&mut stream).await, Some(Ok(_))));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_silent_for_the_limit_times_out_that_long_after_its_last_piece() {
        let mut watch = StallWatch::new(Duration::from_millis(300));
        let mut stream = paced(&[250]);
        assert!(matches!(watch.next(&mut stream).await, Some(Ok(_))));
        let last_piece = Instant::now();
        let error = watch.next(&mut stream).await.unwrap().unwrap_err();
        assert_eq!(error.kind(), ErrorKind::TimedOut);
        assert_eq!(last_piece.elapsed(), Duration::from_millis(300));
        assert!(error.message().contains("--stream-stall-timeout-secs"), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_gives_the_whole_limit_again() {
        let mut watch = StallWatch::new(Duration::from_millis(300));
        tokio::time::sleep(Duration::from_millis(200)).await;
        watch.restart();
        let mut stream = paced(&[250]);
        assert!(matches!(watch.next(&mut stream).await, Some(Ok(_))));
    }
}
