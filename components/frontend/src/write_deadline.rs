//! The write deadline of streaming answers (`--http-write-timeout-secs`): a
//! client that leaves an answer's next event unread for that long — it
//! stopped reading, and the socket's buffers are full — has its request
//! dropped, which cancels it on the worker and frees the engine's KV cache,
//! rather than holding the request open for as long as it keeps the
//! connection.
//!
//! The HTTP server polls an answer's events itself ([`Watched`]), so a
//! burst of tokens goes from the request plane to the socket in one task's
//! turn. What the server does not do is say that it stopped asking: each
//! answer notes the tick of a coarse clock at which it handed out an event
//! the server has not yet followed with another poll, and one task per
//! frontend ([`WriteDeadline::start`]) advances the clock and drops the
//! events of every answer left that way for longer than the limit. An
//! answer is cut off between the limit and a quarter more.

use bytes::Bytes;
use futures::Stream;
use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;
use switchyard_runtime::runtime::Runtime;
use tokio_util::sync::CancellationToken;

/// An answer's SSE events, as the server polls them.
pub type Events = Pin<Box<dyn Stream<Item = Result<Bytes, Infallible>> + Send>>;

/// Ticks of the clock per limit: the cut-off comes at most one tick (this
/// fraction of the limit) late.
const TICKS_PER_LIMIT: u32 = 4;

/// The shortest tick, whatever the limit (tests use limits of milliseconds).
const MIN_TICK: Duration = Duration::from_millis(1);

/// `handed_at` of an answer the server is waiting on (its last poll found
/// nothing ready), or has not been handed anything since it last asked.
const ASKED: u64 = u64::MAX;

/// The deadline shared by every streaming answer of one frontend. Cheap to
/// clone.
#[derive(Clone, Debug)]
pub struct WriteDeadline {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    limit: Duration,
    /// The coarse clock: ticks since start.
    now: AtomicU64,
    /// The answers being written, by a number of their own.
    answers: Mutex<HashMap<u64, Arc<Answer>>>,
    next_id: AtomicU64,
}

struct Answer {
    /// The tick at which the server was handed an event it has not followed
    /// with another poll, or [`ASKED`].
    handed_at: AtomicU64,
    /// `None` once cut off or finished; dropping the events cancels the
    /// request on the worker.
    events: Mutex<Option<Events>>,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer")
            .field("handed_at", &self.handed_at)
            .finish_non_exhaustive()
    }
}

impl Answer {
    fn events(&self) -> MutexGuard<'_, Option<Events>> {
        // A panic while polling leaves at worst an answer cut short.
        self.events.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl WriteDeadline {
    /// Starts the clock on `runtime`, until `stop`. `limit` must not be zero
    /// (the frontend's flags refuse it).
    pub fn start(limit: Duration, runtime: &Runtime, stop: CancellationToken) -> Self {
        let deadline = Self {
            shared: Arc::new(Shared {
                limit,
                now: AtomicU64::new(0),
                answers: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
            }),
        };
        let tick = (limit / TICKS_PER_LIMIT).max(MIN_TICK);
        let shared = Arc::clone(&deadline.shared);
        runtime.spawn(async move {
            let mut ticks = tokio::time::interval(tick);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = ticks.tick() => shared.tick(),
                }
            }
        });
        deadline
    }

    /// `events` under this deadline. The clock starts at once: a server
    /// that never asks for the first event cuts the answer off too.
    pub fn watch(&self, events: Events) -> Watched {
        let answer = Arc::new(Answer {
            handed_at: AtomicU64::new(self.shared.now.load(Ordering::Relaxed)),
            events: Mutex::new(Some(events)),
        });
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        self.shared.lock().insert(id, Arc::clone(&answer));
        Watched {
            shared: Arc::clone(&self.shared),
            answer,
            id,
        }
    }

    /// Answers being written now (for tests).
    #[cfg(test)]
    fn answers(&self) -> usize {
        self.shared.lock().len()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<Answer>>> {
        self.answers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Advances the clock and cuts off every answer handed an event more
    /// than the limit ago (more than `TICKS_PER_LIMIT` whole ticks).
    fn tick(&self) {
        let now = self.now.fetch_add(1, Ordering::Relaxed) + 1;
        let late = |answer: &Answer| {
            let handed_at = answer.handed_at.load(Ordering::Relaxed);
            handed_at != ASKED && now.saturating_sub(handed_at) > u64::from(TICKS_PER_LIMIT)
        };
        let suspects: Vec<Arc<Answer>> = self.lock().values().filter(|a| late(a)).cloned().collect();
        for answer in suspects {
            // Checked again under the answer's own lock: a poll in between
            // means the server asked again after all.
            let mut events = answer.events();
            let cut = if late(&answer) { events.take() } else { None };
            drop(events);
            if cut.is_some() {
                tracing::info!(
                    limit = ?self.limit,
                    "client left the answer unread past --http-write-timeout-secs; request cancelled"
                );
            }
        }
    }
}

/// One answer's events under the deadline: what the server polls.
#[derive(Debug)]
pub struct Watched {
    shared: Arc<Shared>,
    answer: Arc<Answer>,
    id: u64,
}

impl Stream for Watched {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut events = self.answer.events();
        let Some(stream) = events.as_mut() else {
            // Cut off (or finished): the answer ends here, without [DONE].
            return Poll::Ready(None);
        };
        self.answer.handed_at.store(ASKED, Ordering::Relaxed);
        let polled = stream.as_mut().poll_next(cx);
        match &polled {
            Poll::Ready(Some(_)) => {
                let now = self.shared.now.load(Ordering::Relaxed);
                self.answer.handed_at.store(now, Ordering::Relaxed);
            }
            Poll::Ready(None) => *events = None,
            Poll::Pending => {}
        }
        polled
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.shared.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn events(items: &'static [&'static str]) -> Events {
        Box::pin(futures::stream::iter(
            items.iter().map(|s| Ok(Bytes::from_static(s.as_bytes()))),
        ))
    }

    fn deadline(limit: Duration) -> (WriteDeadline, CancellationToken) {
        let stop = CancellationToken::new();
        let runtime = Runtime::new(Default::default());
        (WriteDeadline::start(limit, &runtime, stop.clone()), stop)
    }

    #[tokio::test]
    async fn an_answer_read_to_the_end_is_whole_and_forgotten() {
        let (deadline, stop) = deadline(Duration::from_millis(20));
        let mut watched = deadline.watch(events(&["a", "b", "c"]));
        assert_eq!(deadline.answers(), 1);
        let mut got = Vec::new();
        while let Some(Ok(item)) = watched.next().await {
            got.push(item);
            // Waiting between events, but never past the limit.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(got, ["a", "b", "c"]);
        drop(watched);
        assert_eq!(deadline.answers(), 0);
        stop.cancel();
    }

    #[tokio::test]
    async fn an_answer_waiting_on_the_worker_is_never_cut_off() {
        let (deadline, stop) = deadline(Duration::from_millis(10));
        let (sender, receiver) = futures::channel::mpsc::unbounded::<Result<Bytes, Infallible>>();
        let mut watched = deadline.watch(Box::pin(receiver));
        // The server asks; nothing is ready for many times the limit.
        assert!(futures::poll!(watched.next()).is_pending());
        tokio::time::sleep(Duration::from_millis(100)).await;
        sender.unbounded_send(Ok(Bytes::from_static(b"late"))).unwrap();
        assert_eq!(watched.next().await.unwrap().unwrap(), "late");
        stop.cancel();
    }

    #[tokio::test]
    async fn an_event_left_unread_past_the_limit_cuts_the_answer_off_and_drops_its_events() {
        let (deadline, stop) = deadline(Duration::from_millis(20));
        let (sender, receiver) = futures::channel::mpsc::unbounded::<Result<Bytes, Infallible>>();
        for _ in 0..3 {
            sender.unbounded_send(Ok(Bytes::from_static(b"x"))).unwrap();
        }
        let mut watched = deadline.watch(Box::pin(receiver));
        assert_eq!(watched.next().await.unwrap().unwrap(), "x");
        // The server stops asking, as when the client stops reading.
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(sender.is_closed(), "the events were not dropped");
        assert!(watched.next().await.is_none(), "the answer goes on after the cut-off");
        stop.cancel();
    }

    #[tokio::test]
    async fn an_answer_never_asked_for_is_cut_off_too() {
        let (deadline, stop) = deadline(Duration::from_millis(20));
        let (sender, receiver) = futures::channel::mpsc::unbounded::<Result<Bytes, Infallible>>();
        let _watched = deadline.watch(Box::pin(receiver));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(sender.is_closed());
        stop.cancel();
    }
}
