//! Admission control at the edge, before a request's body is read: a cap
//! on the requests in flight with a bounded, deadlined wait for a place,
//! and optional per-key limits on requests and tokens per second.
//!
//! A request holds its [`Admitted`] place until its response has been sent
//! (or the client went away), so the cap counts streams, not handler calls.
//! Past the cap a request waits in the queue for at most the queue timeout;
//! with the queue full, or after the wait, it gets 503 `overloaded` with
//! `Retry-After`. A key past its rate gets 429 with the seconds until it has
//! budget again. Every refusal is counted in
//! `dynamo_frontend_admission_rejections_total{reason}`.
//!
//! Rates are token buckets holding one second of budget. Requests are
//! charged on admission; tokens (prompt and generated) as the answer streams,
//! so a bucket may go below zero, and the key waits until it has paid back.

use crate::auth::KeyId;
use crate::error::ApiError;
use prometheus::{IntCounterVec, IntGauge, Opts};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchyard_runtime::metrics::{Metrics, MetricsError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// The limits, as configured (see `FrontendArgs`).
#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionSettings {
    /// Requests in flight at once; `None`: no cap.
    pub max_inflight: Option<usize>,
    /// Requests that may wait for a place at once (more get 503 at once).
    pub max_queued: usize,
    /// Longest wait for a place.
    pub queue_timeout: Duration,
    /// Requests per second per key (all callers share one budget when no
    /// keys are configured).
    pub requests_per_second: Option<f64>,
    /// Prompt plus generated tokens per second per key.
    pub tokens_per_second: Option<f64>,
}

/// `dynamo_frontend_admission_*`.
#[derive(Debug, Clone)]
struct AdmissionMetrics {
    /// Label: reason (queue_full|queue_timeout|request_rate|token_rate).
    rejections: IntCounterVec,
    /// Requests waiting for a place now.
    waiting: IntGauge,
}

impl AdmissionMetrics {
    fn register(scope: &Metrics) -> Result<Self, MetricsError> {
        let metrics = Self {
            rejections: IntCounterVec::new(
                Opts::new(
                    "dynamo_frontend_admission_rejections_total",
                    "Requests refused at the edge, by the limit they met",
                ),
                &["reason"],
            )?,
            waiting: IntGauge::new(
                "dynamo_frontend_admission_waiting_requests",
                "Requests waiting for a place under --max-inflight-requests",
            )?,
        };
        scope.register(Box::new(metrics.rejections.clone()))?;
        scope.register(Box::new(metrics.waiting.clone()))?;
        Ok(metrics)
    }
}

/// A token bucket: `level` units now, refilled at `rate` per second up to
/// one second's worth.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    level: f64,
    updated: Instant,
}

impl Bucket {
    fn new(rate: f64) -> Self {
        Self {
            rate,
            level: rate.max(1.0),
            updated: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * self.rate).min(self.rate.max(1.0));
        self.updated = now;
    }

    /// Whether `cost` fits now; otherwise the whole seconds until it will.
    fn room_for(&mut self, cost: f64, now: Instant) -> Result<(), u64> {
        self.refill(now);
        if self.level >= cost {
            Ok(())
        } else {
            Err(((cost - self.level) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

/// One key's budgets.
#[derive(Debug)]
struct KeyBudget {
    requests: Option<Mutex<Bucket>>,
    tokens: Option<Arc<Mutex<Bucket>>>,
}

/// The frontend's admission state, shared by every handler.
#[derive(Debug, Clone)]
pub struct Admission {
    settings: AdmissionSettings,
    places: Option<Arc<Semaphore>>,
    waiting: Arc<AtomicUsize>,
    /// Per key, fixed at start-up (keys are not added at run time).
    budgets: Arc<HashMap<KeyId, KeyBudget>>,
    metrics: AdmissionMetrics,
}

/// A request's place: hold it until the response is sent. Tokens are
/// charged to its key through [`Admitted::charge`].
#[derive(Debug)]
pub struct Admitted {
    _place: Option<OwnedSemaphorePermit>,
    tokens: Option<Arc<Mutex<Bucket>>>,
}

impl Admitted {
    /// Charges `tokens` (prompt or generated) to the request's key.
    pub fn charge(&self, tokens: u32) {
        if let Some(bucket) = &self.tokens {
            let mut bucket = bucket.lock().unwrap_or_else(|e| e.into_inner());
            bucket.refill(Instant::now());
            bucket.level -= f64::from(tokens);
        }
    }
}

/// Decrements the waiting count however the wait ends.
struct Waiting<'a>(&'a Admission);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.waiting.dec();
    }
}

impl Admission {
    /// Checks `settings` (rates must be positive and finite) and registers
    /// the metrics; `keys` are the configured keys' ids (none: one shared
    /// budget).
    pub fn new(
        settings: AdmissionSettings,
        keys: impl Iterator<Item = KeyId>,
        scope: &Metrics,
    ) -> Result<Self, AdmissionError> {
        for (flag, rate) in [
            ("--rate-limit-requests-per-second", settings.requests_per_second),
            ("--rate-limit-tokens-per-second", settings.tokens_per_second),
        ] {
            if let Some(rate) = rate
                && !(rate.is_finite() && rate > 0.0)
            {
                return Err(AdmissionError::Rate { flag, rate });
            }
        }
        let mut ids: Vec<KeyId> = keys.collect();
        if ids.is_empty() {
            ids.push(KeyId::ANONYMOUS);
        }
        let limited = settings.requests_per_second.is_some() || settings.tokens_per_second.is_some();
        let budgets = if limited {
            ids.into_iter()
                .map(|id| {
                    let budget = KeyBudget {
                        requests: settings.requests_per_second.map(|rate| Mutex::new(Bucket::new(rate))),
                        tokens: settings
                            .tokens_per_second
                            .map(|rate| Arc::new(Mutex::new(Bucket::new(rate)))),
                    };
                    (id, budget)
                })
                .collect()
        } else {
            HashMap::new()
        };
        Ok(Self {
            places: settings.max_inflight.map(|n| Arc::new(Semaphore::new(n))),
            settings,
            waiting: Arc::new(AtomicUsize::new(0)),
            budgets: Arc::new(budgets),
            metrics: AdmissionMetrics::register(scope)?,
        })
    }

    fn refuse(&self, reason: &str, error: ApiError) -> ApiError {
        self.metrics.rejections.with_label_values(&[reason]).inc();
        error
    }

    /// A place for a request from `key`, or the 429/503 to answer with.
    pub async fn admit(&self, key: KeyId) -> Result<Admitted, ApiError> {
        let budget = self.budgets.get(&key);
        if let Some(budget) = budget {
            let now = Instant::now();
            if let Some(tokens) = &budget.tokens {
                // Tokens are charged as they stream; a key in debt waits.
                let mut tokens = tokens.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(seconds) = tokens.room_for(1.0, now) {
                    let message = format!(
                        "this API key used its {} tokens per second (--rate-limit-tokens-per-second); retry in {seconds} s",
                        tokens.rate
                    );
                    return Err(self.refuse("token_rate", ApiError::rate_limited(message, seconds)));
                }
            }
            if let Some(requests) = &budget.requests {
                let mut requests = requests.lock().unwrap_or_else(|e| e.into_inner());
                match requests.room_for(1.0, now) {
                    Ok(()) => requests.level -= 1.0,
                    Err(seconds) => {
                        let message = format!(
                            "this API key used its {} requests per second (--rate-limit-requests-per-second); retry in {seconds} s",
                            requests.rate
                        );
                        return Err(self.refuse("request_rate", ApiError::rate_limited(message, seconds)));
                    }
                }
            }
        }
        let tokens = budget.and_then(|b| b.tokens.clone());
        let Some(places) = &self.places else {
            return Ok(Admitted { _place: None, tokens });
        };
        if let Ok(place) = places.clone().try_acquire_owned() {
            return Ok(Admitted {
                _place: Some(place),
                tokens,
            });
        }
        let cap = self.settings.max_inflight.unwrap_or_default();
        let retry_after = self.settings.queue_timeout.as_secs().max(1);
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.settings.max_queued {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            let message = format!(
                "the frontend is at its limit of {cap} requests in flight and {} waiting (--max-inflight-requests, --max-queued-requests); retry later",
                self.settings.max_queued
            );
            return Err(self.refuse("queue_full", ApiError::overloaded(message, retry_after)));
        }
        self.metrics.waiting.inc();
        let _waiting = Waiting(self);
        match tokio::time::timeout(self.settings.queue_timeout, places.clone().acquire_owned()).await {
            Ok(Ok(place)) => Ok(Admitted {
                _place: Some(place),
                tokens,
            }),
            // The semaphore is never closed; treat it like a timeout anyway.
            Ok(Err(_)) | Err(_) => {
                let message = format!(
                    "no place among the {cap} requests in flight freed up within {:?} (--http-queue-timeout-ms); retry later",
                    self.settings.queue_timeout
                );
                Err(self.refuse("queue_timeout", ApiError::overloaded(message, retry_after)))
            }
        }
    }
}

/// A limit that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    #[error("{flag} must be a positive number, not {rate}")]
    Rate { flag: &'static str, rate: f64 },
    #[error("cannot create the admission metrics")]
    Metrics(#[from] MetricsError),
}

#[cfg(test)]
mod tests {
    use super::{Admission, AdmissionSettings};
    use crate::auth::KeyId;
    use std::time::Duration;
    use switchyard_runtime::metrics::Metrics;

    fn settings() -> AdmissionSettings {
        AdmissionSettings {
            max_inflight: None,
            max_queued: 0,
            queue_timeout: Duration::from_millis(50),
            requests_per_second: None,
            tokens_per_second: None,
        }
    }

    fn rejections(admission: &Admission, reason: &str) -> u64 {
        admission.metrics.rejections.with_label_values(&[reason]).get()
    }

    #[tokio::test]
    async fn past_the_cap_requests_wait_in_a_bounded_queue_then_get_503() {
        let settings = AdmissionSettings {
            max_inflight: Some(1),
            max_queued: 1,
            ..settings()
        };
        let admission = Admission::new(
            settings,
            std::iter::empty(),
            &Metrics::root(prometheus::Registry::new()),
        )
        .unwrap();
        let first = admission.admit(KeyId::ANONYMOUS).await.unwrap();
        // The second waits; the third finds the queue full at once.
        let waiter = tokio::spawn({
            let admission = admission.clone();
            async move { admission.admit(KeyId::ANONYMOUS).await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let full = admission.admit(KeyId::ANONYMOUS).await.unwrap_err();
        assert_eq!(full.status, 503);
        assert!(full.message.contains("--max-queued-requests"), "{}", full.message);
        assert_eq!(rejections(&admission, "queue_full"), 1);
        // The waiter times out, as nobody frees the place.
        let timed_out = waiter.await.unwrap().unwrap_err();
        assert!(timed_out.message.contains("within"), "{}", timed_out.message);
        assert_eq!(rejections(&admission, "queue_timeout"), 1);
        // Freeing the place lets a waiter in.
        let waiter = tokio::spawn({
            let admission = admission.clone();
            async move { admission.admit(KeyId::ANONYMOUS).await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(first);
        waiter.await.unwrap().unwrap();
        assert_eq!(admission.waiting.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn each_key_has_its_own_request_and_token_budget() {
        let settings = AdmissionSettings {
            requests_per_second: Some(2.0),
            tokens_per_second: Some(100.0),
            ..settings()
        };
        let keys = [KeyId(0), KeyId(1)];
        let admission =
            Admission::new(settings, keys.into_iter(), &Metrics::root(prometheus::Registry::new())).unwrap();
        let first = admission.admit(KeyId(0)).await.unwrap();
        admission.admit(KeyId(0)).await.unwrap();
        let limited = admission.admit(KeyId(0)).await.unwrap_err();
        assert_eq!(limited.status, 429);
        assert_eq!(limited.retry_after, Some(1));
        assert_eq!(rejections(&admission, "request_rate"), 1);
        // Key 1 is untouched; then it spends its tokens and is refused.
        let other = admission.admit(KeyId(1)).await.unwrap();
        other.charge(1000);
        let broke = admission.admit(KeyId(1)).await.unwrap_err();
        assert_eq!(broke.status, 429);
        assert_eq!(
            broke.retry_after,
            Some(10),
            "900 tokens in debt at 100/s: {}",
            broke.message
        );
        assert_eq!(rejections(&admission, "token_rate"), 1);
        drop(first);
    }

    #[test]
    fn rates_must_be_positive() {
        let settings = AdmissionSettings {
            tokens_per_second: Some(0.0),
            ..settings()
        };
        let error = Admission::new(
            settings,
            std::iter::empty(),
            &Metrics::root(prometheus::Registry::new()),
        )
        .unwrap_err();
        assert!(error.to_string().contains("--rate-limit-tokens-per-second"), "{error}");
    }
}
