//! A history of streamed requests and the checker that judges it, shared by
//! the fault matrix (`faults.rs`) and the chaos run (`chaos.rs`).
//!
//! Every request is recorded as the client saw it: when it was sent, which
//! prompt it carried, the HTTP status, the worker the frontend named in
//! `x-switchyard-worker-id`, and how it ended. The client reads every
//! stream to its very end, so what the checker asserts can fail: a stream
//! that ends twice (two `[DONE]`s, an error event after `[DONE]`, text after
//! the end), ends without saying how, or fails with no message is a
//! violation. [`check`] then asserts the invariants:
//!
//! - every request ended exactly once, and none is lost;
//! - every completed answer is byte for byte the answer a fault-free run
//!   gave for its prompt (the mocker is a greedy model: a pure function of
//!   the prompt), migrated or not;
//! - every failure carries an error a client can act on (a status and a
//!   message, or an SSE error event with a message);
//! - no request went to an instance more than one TTL after it had left
//!   discovery (a [`Presence`] watcher records when each instance left),
//!   and an answer that does not name its worker is itself a failure.
//!
//! The `checker_*` tests feed [`check`] bad histories and see it fail.

use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchyard_runtime::discovery::{Bucket, Discovery, Query, WatchEvent};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How one request ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Ending {
    /// `[DONE]` after this text; `finished` when exactly one finish reason came.
    Completed { text: String, finished: bool },
    /// An HTTP status, an SSE error event, or a transport failure.
    Failed(String),
    /// Still running when the client gave up on it.
    Lost,
}

#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub(crate) sent_at: Instant,
    /// When the answer's status and headers came: the frontend routed the
    /// request (the last time, after any retry) between `sent_at` and this.
    pub(crate) answered_at: Option<Instant>,
    pub(crate) ended_at: Option<Instant>,
    /// Which of the run's prompts it carried.
    pub(crate) prompt: usize,
    /// The HTTP status of the answer, when one came.
    pub(crate) status: Option<u16>,
    /// The worker instance the frontend routed the request to.
    pub(crate) worker: Option<u64>,
    pub(crate) first_token: bool,
    pub(crate) ending: Option<Ending>,
    /// What the answer did that no answer may: ending twice, text after
    /// the end, ending without saying how, failing without a message.
    pub(crate) violations: Vec<String>,
}

impl Record {
    pub(crate) fn new(prompt: usize) -> Self {
        Record {
            sent_at: Instant::now(),
            answered_at: None,
            ended_at: None,
            prompt,
            status: None,
            worker: None,
            first_token: false,
            ending: None,
            violations: Vec::new(),
        }
    }
}

/// The records of a run, appended to by many clients.
pub(crate) type History = Arc<Mutex<Vec<Record>>>;

/// Sends one streaming chat `body` to `url` and reads the answer to its end,
/// filling `history[index]` in as it goes; returns how it ended.
pub(crate) async fn stream_chat(
    http: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
    history: &History,
    index: usize,
) -> Ending {
    let violation = |what: String| history.lock().unwrap()[index].violations.push(what);
    let response = match http.post(format!("{url}/v1/chat/completions")).json(body).send().await {
        Ok(response) => response,
        Err(_) => return Ending::Failed("transport".into()),
    };
    let status = response.status();
    {
        let mut history = history.lock().unwrap();
        history[index].status = Some(status.as_u16());
        history[index].answered_at = Some(Instant::now());
    }
    if !status.is_success() {
        // A client acts on the status and OpenAI's error body.
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        let message = body["error"]["message"].as_str().unwrap_or_default().to_string();
        if message.is_empty() {
            violation(format!("status {status} without an error message: {body}"));
        }
        return Ending::Failed(format!("{} {message}", status.as_u16()));
    }
    let worker = response
        .headers()
        .get("x-switchyard-worker-id")
        .and_then(|v| u64::from_str_radix(v.to_str().ok()?, 16).ok());
    if worker.is_none() {
        violation("an answer without x-switchyard-worker-id".into());
    }
    history.lock().unwrap()[index].worker = worker;
    let mut answer = Answer::default();
    let mut broken = false;
    let mut bytes = response.bytes_stream();
    while let Some(chunk) = bytes.next().await {
        let Ok(chunk) = chunk else {
            broken = true;
            break;
        };
        answer.feed(&String::from_utf8_lossy(&chunk));
        if answer.first_token {
            history.lock().unwrap()[index].first_token = true;
        }
    }
    let (ending, violations) = answer.finish(broken);
    history.lock().unwrap()[index].violations.extend(violations);
    ending
}

/// Steady load: `clients` loops, each sending streaming chats (a prompt
/// drawn from `bodies` by its own seeded generator) to one of `urls` until
/// stopped. A request still running `lost_after` after it was sent is lost.
pub(crate) struct Load {
    pub(crate) history: History,
    stop: CancellationToken,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub(crate) fn start(
        urls: &[String],
        clients: usize,
        bodies: Arc<Vec<serde_json::Value>>,
        seed: u64,
        lost_after: Duration,
    ) -> Self {
        use rand::{Rng, SeedableRng};
        let history = History::default();
        let stop = CancellationToken::new();
        let http = reqwest::Client::new();
        let clients = (0..clients)
            .map(|client| {
                let url = urls[client % urls.len()].clone();
                let (history, stop, http, bodies) = (history.clone(), stop.clone(), http.clone(), bodies.clone());
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (client as u64).wrapping_mul(0x9e37_79b9));
                tokio::spawn(async move {
                    while !stop.is_cancelled() {
                        let prompt = rng.random_range(0..bodies.len());
                        let index = {
                            let mut history = history.lock().unwrap();
                            history.push(Record::new(prompt));
                            history.len() - 1
                        };
                        let ending = tokio::time::timeout(
                            lost_after,
                            stream_chat(&http, &url, &bodies[prompt], &history, index),
                        )
                        .await
                        .unwrap_or(Ending::Lost);
                        let failed = matches!(ending, Ending::Failed(_));
                        {
                            let mut history = history.lock().unwrap();
                            history[index].ending = Some(ending);
                            history[index].ended_at = Some(Instant::now());
                        }
                        if failed {
                            // A client backs off a little rather than spin on a dead address.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                })
            })
            .collect();
        Self { history, stop, clients }
    }

    /// Stops sending and waits for every request in flight to end (or be declared lost).
    pub(crate) async fn finish(self) -> Vec<Record> {
        self.stop.cancel();
        for client in self.clients {
            client.await.unwrap();
        }
        self.history.lock().unwrap().clone()
    }
}

/// A streamed chat answer as the client reads it, to its very end: its
/// text, and every way it said it ended (one is the contract).
#[derive(Debug, Default)]
pub(crate) struct Answer {
    pending: String,
    text: String,
    finish_reasons: usize,
    first_token: bool,
    ends: Vec<Ending>,
    violations: Vec<String>,
}

impl Answer {
    /// Takes the next bytes of the SSE body.
    pub(crate) fn feed(&mut self, text: &str) {
        self.pending.push_str(text);
        while let Some(end) = self.pending.find('\n') {
            let line: String = self.pending.drain(..=end).collect();
            self.line(line.trim_end());
        }
    }

    fn line(&mut self, line: &str) {
        if line.starts_with("event: error") {
            self.ends.push(Ending::Failed("error event".into()));
            return;
        }
        let Some(data) = line.strip_prefix("data: ") else {
            return;
        };
        if let Some(Ending::Failed(why)) = self.ends.last_mut()
            && why == "error event"
        {
            // The error event's own data line says what went wrong.
            let error: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
            let message = error["error"]["message"].as_str().unwrap_or_default();
            if message.is_empty() {
                self.violations
                    .push(format!("an error event without a message: {data}"));
            }
            *why = format!("error event {message}");
            return;
        }
        if data == "[DONE]" {
            self.ends.push(Ending::Completed {
                text: self.text.clone(),
                finished: self.finish_reasons == 1,
            });
            return;
        }
        if !self.ends.is_empty() {
            self.violations.push(format!("data after the answer ended: {data}"));
            return;
        }
        let chunk: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            self.text.push_str(piece);
            self.first_token |= !piece.is_empty();
        }
        if chunk["choices"][0]["finish_reason"].is_string() {
            self.finish_reasons += 1;
        }
    }

    /// How the answer ended, and what it did that no answer may.
    pub(crate) fn finish(mut self, broken: bool) -> (Ending, Vec<String>) {
        if self.ends.len() > 1 {
            let ends = std::mem::take(&mut self.ends);
            self.violations
                .push(format!("the answer ended {} times: {ends:?}", ends.len()));
            self.ends = ends;
        }
        let ending = match self.ends.into_iter().next() {
            Some(ending) => ending,
            None => {
                // Cut off with neither an error event nor [DONE]: the client cannot tell why.
                self.violations.push(format!(
                    "the stream ended without [DONE] or an error event (broken: {broken})"
                ));
                Ending::Failed("stream ended without [DONE]".into())
            }
        };
        (ending, self.violations)
    }
}

/// Per instance: (when, present) in the order a watcher saw them.
type PresenceLog = BTreeMap<u64, Vec<(Instant, bool)>>;

/// When each worker instance was in discovery, as a watcher saw it.
#[derive(Clone, Default)]
pub(crate) struct Presence {
    changes: Arc<Mutex<PresenceLog>>,
}

impl Presence {
    /// Watches the instances registered in `discovery` until `stop`.
    pub(crate) async fn watch(discovery: Arc<dyn Discovery>, stop: CancellationToken) -> Self {
        let mut watch = discovery.watch(&Query::bucket(Bucket::Instances)).await.unwrap();
        let presence = Self::default();
        let recorder = presence.clone();
        tokio::spawn(async move {
            // Keep the discovery client (and its lease) alive as long as the watch.
            let _discovery = discovery;
            // Keys per instance (an instance has one key per endpoint).
            let mut keys: BTreeMap<u64, usize> = BTreeMap::new();
            loop {
                let event = tokio::select! {
                    _ = stop.cancelled() => return,
                    event = watch.next() => match event { Some(Ok(event)) => event, _ => return },
                };
                let before: Vec<u64> = keys.iter().filter(|(_, n)| **n > 0).map(|(id, _)| *id).collect();
                match event {
                    WatchEvent::Snapshot(registrations) => {
                        keys.clear();
                        for registration in registrations {
                            *keys.entry(registration.key.instance_id).or_default() += 1;
                        }
                    }
                    WatchEvent::Put(registration) => *keys.entry(registration.key.instance_id).or_default() += 1,
                    WatchEvent::Delete(key) => {
                        let n = keys.entry(key.instance_id).or_default();
                        *n = n.saturating_sub(1);
                    }
                }
                let now = Instant::now();
                let mut changes = recorder.changes.lock().unwrap();
                for (id, n) in &keys {
                    if (*n > 0) != before.contains(id) {
                        changes.entry(*id).or_default().push((now, *n > 0));
                    }
                }
                for id in before.iter().filter(|id| !keys.contains_key(id)) {
                    changes.entry(*id).or_default().push((now, false));
                }
            }
        });
        presence
    }

    /// How many times an instance left discovery.
    pub(crate) fn departures(&self) -> usize {
        let changes = self.changes.lock().unwrap();
        changes.values().flatten().filter(|(_, present)| !present).count()
    }

    /// When `instance` came (+) and went (-), as offsets from `start`.
    fn timeline(&self, instance: u64, start: Instant) -> String {
        let changes = self.changes.lock().unwrap();
        let steps: Vec<String> = changes
            .get(&instance)
            .into_iter()
            .flatten()
            .map(|(when, present)| {
                let sign = if *present { '+' } else { '-' };
                format!("{sign}{:.2}s", when.saturating_duration_since(start).as_secs_f64())
            })
            .collect();
        steps.join(" ")
    }

    /// When `instance` left discovery, if it was out of it at `at`.
    fn left_before(&self, instance: u64, at: Instant) -> Option<Instant> {
        let changes = self.changes.lock().unwrap();
        let (when, present) = changes.get(&instance)?.iter().rev().find(|(when, _)| *when <= at)?;
        (!present).then_some(*when)
    }
}

/// The counts of a checked history.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tally {
    pub(crate) sent: usize,
    pub(crate) completed: usize,
    pub(crate) failed: usize,
    pub(crate) lost: usize,
}

/// Counts `history` without judging it.
pub(crate) fn tally(history: &[Record]) -> Tally {
    let mut tally = Tally {
        sent: history.len(),
        ..Tally::default()
    };
    for record in history {
        match record.ending {
            Some(Ending::Completed { .. }) => tally.completed += 1,
            Some(Ending::Failed(_)) => tally.failed += 1,
            _ => tally.lost += 1,
        }
    }
    tally
}

/// The requests that failed, with why.
pub(crate) fn failures(history: &[Record]) -> Vec<&Record> {
    history
        .iter()
        .filter(|r| matches!(r.ending, Some(Ending::Failed(_))))
        .collect()
}

/// What a run is checked against: the fault-free answer to each of its
/// prompts, and the discovery lifetime of its registrations.
pub(crate) struct Expectations<'a> {
    /// `answers[prompt]`: the text a fault-free run streamed for it.
    pub(crate) answers: &'a [String],
    /// When given, routing is checked against who was in discovery (and
    /// every answer must name its worker).
    pub(crate) presence: Option<&'a Presence>,
    pub(crate) ttl: Duration,
}

/// Asserts the history's invariants (see the module docs) and counts it.
pub(crate) fn check(scenario: &str, history: &[Record], expected: &Expectations<'_>) -> Tally {
    let mut tally = Tally {
        sent: history.len(),
        ..Tally::default()
    };
    for (i, record) in history.iter().enumerate() {
        assert!(
            record.violations.is_empty(),
            "{scenario}: request {i} broke the answer's contract: {:?}",
            record.violations
        );
        if expected.presence.is_some() && record.status == Some(200) {
            assert!(
                record.worker.is_some(),
                "{scenario}: request {i} does not say which worker it went to"
            );
        }
        match record.ending.as_ref().expect("the client ends every request") {
            Ending::Completed { text, finished } => {
                let want = &expected.answers[record.prompt];
                if text != want {
                    let at = text.bytes().zip(want.bytes()).take_while(|(a, b)| a == b).count();
                    let around = |s: &str| {
                        s.get(at.saturating_sub(20)..)
                            .unwrap_or(s)
                            .chars()
                            .take(60)
                            .collect::<String>()
                    };
                    panic!(
                        "{scenario}: request {i} got an answer that differs from the fault-free one at byte {at} \
                         ({} vs {} bytes): got …{:?}, want …{:?}",
                        text.len(),
                        want.len(),
                        around(text),
                        around(want)
                    );
                }
                assert!(*finished, "{scenario}: request {i} ended without a finish reason");
                assert!(record.first_token);
                tally.completed += 1;
            }
            Ending::Failed(_) => tally.failed += 1,
            Ending::Lost => tally.lost += 1,
        }
        // The frontend routed the request somewhere between its sending and
        // its answer (after a retry, late in that span): it went to a departed
        // instance only if that instance was still out of discovery when the
        // answer came, and had left more than a TTL before the request was sent.
        let routed_by = record.answered_at.unwrap_or(record.sent_at);
        if let (Some(presence), Some(worker)) = (expected.presence, record.worker)
            && let Some(left) = presence.left_before(worker, routed_by)
        {
            let late = record.sent_at - left;
            let start = history[0].sent_at;
            assert!(
                late <= expected.ttl,
                "{scenario}: request {i} went to instance {worker:x} {late:?} after it left discovery \
                 (sent at +{:?}, ended {:?}; the instance's comings and goings: {})",
                record.sent_at - start,
                record.ending,
                presence.timeline(worker, start)
            );
        }
    }
    let lost: Vec<_> = history.iter().filter(|r| r.ending == Some(Ending::Lost)).collect();
    assert!(lost.is_empty(), "{scenario}: requests lost: {lost:?}");
    tally
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A chat chunk carrying `text`, and one with the finish reason.
    fn sse(text: &str) -> String {
        format!("data: {}\n\n", json!({"choices": [{"delta": {"content": text}}]}))
    }

    const FINISH: &str = "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
    const DONE: &str = "data: [DONE]\n\n";
    const TTL: Duration = Duration::from_secs(1);

    fn read(body: &str) -> (Ending, Vec<String>) {
        let mut answer = Answer::default();
        // Fed in two pieces, cut mid-line, as a network delivers it.
        let (first, second) = body.split_at(body.len() / 2);
        answer.feed(first);
        answer.feed(second);
        answer.finish(false)
    }

    fn completed(text: &str, finished: bool) -> Ending {
        Ending::Completed {
            text: text.into(),
            finished,
        }
    }

    #[test]
    fn checker_reads_a_clean_answer_and_a_clean_failure() {
        let (ending, violations) = read(&format!("{}{}{FINISH}{DONE}", sse(" All"), sse(" aboard")));
        assert_eq!(ending, completed(" All aboard", true));
        assert!(violations.is_empty(), "{violations:?}");
        let failure = "event: error\ndata: {\"error\":{\"message\":\"the worker was lost\"}}\n\n";
        let (ending, violations) = read(&format!("{}{failure}", sse("all ")));
        assert_eq!(ending, Ending::Failed("error event the worker was lost".into()));
        assert!(violations.is_empty(), "{violations:?}");
    }

    #[test]
    fn checker_sees_an_answer_that_ends_twice_or_goes_on_after_its_end() {
        let (_, violations) = read(&format!("{}{FINISH}{DONE}{DONE}", sse("a")));
        assert!(violations.iter().any(|v| v.contains("ended 2 times")), "{violations:?}");
        let error = "event: error\ndata: {\"error\":{\"message\":\"late\"}}\n\n";
        let (_, violations) = read(&format!("{}{FINISH}{DONE}{error}", sse("a")));
        assert!(violations.iter().any(|v| v.contains("ended 2 times")), "{violations:?}");
        let (_, violations) = read(&format!("{}{FINISH}{DONE}{}", sse("a"), sse("more")));
        assert!(
            violations.iter().any(|v| v.contains("after the answer ended")),
            "{violations:?}"
        );
        let (ending, _) = read(&format!("{}{FINISH}{FINISH}{DONE}", sse("a")));
        assert_eq!(ending, completed("a", false), "two finish reasons");
    }

    #[test]
    fn checker_sees_an_answer_cut_off_without_a_word_or_failing_without_a_message() {
        let (ending, violations) = read(&sse("a"));
        assert!(matches!(ending, Ending::Failed(_)));
        assert!(
            violations.iter().any(|v| v.contains("without [DONE]")),
            "{violations:?}"
        );
        let (_, violations) = read("event: error\ndata: {}\n\n");
        assert!(
            violations.iter().any(|v| v.contains("without a message")),
            "{violations:?}"
        );
    }

    /// One request's record, as the client would leave it.
    fn record(ending: Ending, worker: Option<u64>) -> Record {
        Record {
            status: Some(200),
            worker,
            first_token: true,
            ending: Some(ending),
            ..Record::new(0)
        }
    }

    const ANSWER: &str = " The river runs past a small town.";

    fn expect<'a>(presence: Option<&'a Presence>) -> Expectations<'a> {
        static ANSWERS: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| vec![ANSWER.to_string()]);
        Expectations {
            answers: &ANSWERS,
            presence,
            ttl: TTL,
        }
    }

    #[test]
    fn checker_passes_a_clean_history() {
        let presence = Presence::default();
        let tally = check(
            "clean",
            &[record(completed(ANSWER, true), Some(1))],
            &expect(Some(&presence)),
        );
        assert_eq!((tally.sent, tally.completed), (1, 1));
    }

    #[test]
    #[should_panic(expected = "broke the answer's contract")]
    fn checker_fails_a_history_with_a_violation() {
        let mut bad = record(completed(ANSWER, true), Some(1));
        bad.violations.push("the answer ended 2 times".into());
        check("violation", &[bad], &expect(None));
    }

    #[test]
    #[should_panic(expected = "does not say which worker")]
    fn checker_fails_an_answer_without_its_worker_when_presence_is_checked() {
        let presence = Presence::default();
        check(
            "no header",
            &[record(completed(ANSWER, true), None)],
            &expect(Some(&presence)),
        );
    }

    #[test]
    #[should_panic(expected = "differs from the fault-free one at byte 33")]
    fn checker_fails_an_answer_with_a_full_stop_missing() {
        let short = completed(" The river runs past a small town", true);
        check("short", &[record(short, Some(1))], &expect(None));
    }

    #[test]
    #[should_panic(expected = "differs from the fault-free one at byte 23")]
    fn checker_fails_an_answer_spliced_with_the_same_word_count() {
        // As many words as the fault-free answer: one repeated across the splice, one lost.
        let spliced = completed(" The river runs past a a small.", true);
        check("spliced", &[record(spliced, Some(1))], &expect(None));
    }

    #[test]
    #[should_panic(expected = "ended without a finish reason")]
    fn checker_fails_an_answer_without_a_finish_reason() {
        check(
            "unfinished",
            &[record(completed(ANSWER, false), Some(1))],
            &expect(None),
        );
    }

    #[test]
    #[should_panic(expected = "requests lost")]
    fn checker_fails_a_lost_request() {
        check("lost", &[record(Ending::Lost, Some(1))], &expect(None));
    }

    #[test]
    fn checker_passes_a_request_answered_by_a_worker_back_in_discovery() {
        // Sent while the worker was out (a retry elsewhere took a while), and
        // routed to it after it came back: nothing was sent to a departed worker.
        let presence = Presence::default();
        let left = Instant::now();
        presence
            .changes
            .lock()
            .unwrap()
            .insert(7, vec![(left, false), (left + TTL * 3, true)]);
        let mut retried = record(completed(ANSWER, true), Some(7));
        retried.sent_at = left + TTL * 2;
        retried.answered_at = Some(left + TTL * 4);
        check("back", &[retried], &expect(Some(&presence)));
    }

    #[test]
    #[should_panic(expected = "after it left discovery")]
    fn checker_fails_a_request_sent_to_a_worker_long_gone() {
        let presence = Presence::default();
        let left = Instant::now();
        presence.changes.lock().unwrap().insert(7, vec![(left, false)]);
        let mut late = record(completed(ANSWER, true), Some(7));
        late.sent_at = left + TTL * 2;
        check("late", &[late], &expect(Some(&presence)));
    }
}
