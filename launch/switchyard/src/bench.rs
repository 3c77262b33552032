//! `switchyard bench`: a load generator for any OpenAI-compatible endpoint.
//!
//! Closed loop (`--concurrency N`: N requests always in flight), open loop
//! (`--rate R`: Poisson arrivals, R per second, each request on its own), or
//! a replayed trace (`--trace FILE`: Mooncake's format, each request at its
//! recorded time with its recorded prompt blocks, see `trace.rs`). Open loops
//! keep at most `--max-in-flight` requests out. Stops after `--requests` or
//! `--duration` (a trace: at its end). Measures per request the time
//! to first token, the gaps between tokens and the end-to-end time; reports
//! percentiles, throughput and errors by status as a Markdown table (stdout)
//! and optionally JSON and an SVG chart.

use crate::svg::{Chart, Series};
use crate::trace::{TraceRequest, parse_line, prompt_text};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Flags of `switchyard bench`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct BenchArgs {
    /// Base URL of the OpenAI API (without /v1).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub(crate) url: String,
    #[arg(long, default_value = "mock-model")]
    pub(crate) model: String,
    /// Requests kept in flight (closed loop). Ignored with --rate.
    #[arg(long, default_value_t = 8)]
    pub(crate) concurrency: usize,
    /// Poisson arrivals per second (open loop) instead of a fixed concurrency.
    #[arg(long)]
    pub(crate) rate: Option<f64>,
    /// Stop after this many requests.
    #[arg(long, default_value_t = 200)]
    pub(crate) requests: usize,
    /// Stop sending after this many seconds (whichever comes first).
    #[arg(long)]
    pub(crate) duration: Option<f64>,
    /// Prompt length in words: `N`, or `A-B` for uniform between A and B.
    #[arg(long, default_value = "64")]
    pub(crate) prompt_tokens: Length,
    /// Output tokens (`max_tokens`): `N` or `A-B`.
    #[arg(long, default_value = "64")]
    pub(crate) output_tokens: Length,
    /// Stream the answers (SSE); TTFT and ITL need it.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub(crate) stream: bool,
    /// `chat` (/v1/chat/completions) or `completions` (/v1/completions).
    #[arg(long, default_value = "chat")]
    pub(crate) api: Api,
    /// Seed of the arrival and length draws (runs with the same seed send the same load).
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
    /// Write the report as JSON here.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Write the Markdown table here too.
    #[arg(long)]
    pub(crate) markdown: Option<PathBuf>,
    /// Write an SVG of end-to-end latency over the run into this directory.
    #[arg(long)]
    pub(crate) plot: Option<PathBuf>,
    /// No progress bar (for scripts and logs).
    #[arg(long)]
    pub(crate) quiet: bool,
    /// Replay this Mooncake-format trace (JSON lines) instead of drawing requests.
    #[arg(long)]
    pub(crate) trace: Option<PathBuf>,
    /// Prompt tokens per hash id of the trace.
    #[arg(long, default_value_t = 512)]
    pub(crate) trace_block_size: u32,
    /// Divide the trace's inter-arrival times by this.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) trace_speedup: f64,
    /// Most requests in flight in an open loop (--rate, --trace); one due at the cap waits.
    #[arg(long, default_value_t = 1024)]
    pub(crate) max_in_flight: usize,
    /// API key sent as `Authorization: Bearer` (the frontend's --api-key).
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub(crate) api_key: Option<String>,
    /// Workers' metrics URLs (comma separated): report the run's prefix-cache hit rate from them.
    #[arg(long, value_delimiter = ',')]
    pub(crate) worker_metrics: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Api {
    Chat,
    Completions,
}

/// A length distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) enum Length {
    Fixed(u32),
    Uniform(u32, u32),
}

impl std::str::FromStr for Length {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let number = |t: &str| {
            t.trim()
                .parse::<u32>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{t:?} is not a positive whole number (use N or A-B, e.g. 64 or 32-128)"))
        };
        match text.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (number(a)?, number(b)?);
                if a > b {
                    return Err(format!("{text:?}: the range must go from low to high"));
                }
                Ok(Length::Uniform(a, b))
            }
            None => Ok(Length::Fixed(number(text)?)),
        }
    }
}

impl Length {
    pub(crate) fn draw(self, rng: &mut StdRng) -> u32 {
        match self {
            Length::Fixed(n) => n,
            Length::Uniform(a, b) => rng.random_range(a..=b),
        }
    }
}

/// One request's measurements (seconds, from its own start).
#[derive(Debug, Clone)]
struct Sample {
    /// When it was sent, from the start of the run.
    sent_at: f64,
    ttft: Option<f64>,
    gaps: Vec<f64>,
    e2e: f64,
    output_tokens: u32,
    /// `None` when it succeeded; else the HTTP status or "transport".
    error: Option<String>,
    /// It was due while `--max-in-flight` requests were out, so it went late.
    waited_for_cap: bool,
}

/// Percentiles of one measure, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub(crate) struct Quantiles {
    pub(crate) mean: f64,
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
}

impl Quantiles {
    fn of(mut values: Vec<f64>) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        values.sort_by(f64::total_cmp);
        let at = |q: f64| values[((values.len() as f64 * q).ceil() as usize).clamp(1, values.len()) - 1] * 1000.0;
        Self {
            mean: values.iter().sum::<f64>() / values.len() as f64 * 1000.0,
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    pub(crate) url: String,
    pub(crate) model: String,
    pub(crate) mode: String,
    pub(crate) requests: usize,
    pub(crate) completed: usize,
    pub(crate) errors: BTreeMap<String, usize>,
    pub(crate) duration_s: f64,
    pub(crate) requests_per_s: f64,
    pub(crate) output_tokens_per_s: f64,
    pub(crate) ttft_ms: Quantiles,
    pub(crate) itl_ms: Quantiles,
    pub(crate) e2e_ms: Quantiles,
    /// How long the failed requests took to fail (a refusal at the edge
    /// should take milliseconds).
    pub(crate) refused_ms: Quantiles,
    /// Open loop: requests sent late because `--max-in-flight` were out.
    pub(crate) waited_for_cap: usize,
    /// Prompt tokens the workers found cached ÷ tokens they looked up, over
    /// the run (`--worker-metrics`).
    pub(crate) prefix_cache_hit_rate: Option<f64>,
    /// (percentile, TTFT ms) at 5 %, 10 %, … 95 % and 99 %, for charts.
    pub(crate) ttft_curve_ms: Vec<(f64, f64)>,
}

impl Report {
    pub(crate) fn markdown(&self) -> String {
        let q = |q: &Quantiles| format!("{:.1} / {:.1} / {:.1}", q.p50, q.p90, q.p99);
        let errors = if self.errors.is_empty() {
            "none".to_string()
        } else {
            let counts = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ");
            format!("{counts} (in {} ms)", q(&self.refused_ms))
        };
        let hits = self
            .prefix_cache_hit_rate
            .map_or_else(|| "n/a".to_string(), |rate| format!("{:.1} %", rate * 100.0));
        format!(
            "| mode | requests | ok | req/s | output tok/s | TTFT p50/p90/p99 ms | ITL p50/p90/p99 ms | E2E p50/p90/p99 ms | prefix-cache hits | sent late (cap) | errors |\n\
             |---|---:|---:|---:|---:|---|---|---|---:|---:|---|\n\
             | {} | {} | {} | {:.1} | {:.0} | {} | {} | {} | {} | {} | {} |\n",
            self.mode,
            self.requests,
            self.completed,
            self.requests_per_s,
            self.output_tokens_per_s,
            q(&self.ttft_ms),
            q(&self.itl_ms),
            q(&self.e2e_ms),
            hits,
            self.waited_for_cap,
            errors
        )
    }
}

/// The request body for one draw.
fn body(args: &BenchArgs, prompt_words: u32, max_tokens: u32) -> serde_json::Value {
    request_body(args, random_prompt(prompt_words), max_tokens)
}

fn random_prompt(prompt_words: u32) -> String {
    // Distinct prompts (a counter word first) so prefix caches do not turn the load into cache hits.
    (0..prompt_words)
        .map(|i| {
            if i == 0 {
                format!("r{}", rand::random::<u32>())
            } else {
                "word".to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A completion or chat request for `prompt` (the chat form adds the role
/// word `user:` before it in the mocker's flat prompt: one token more).
fn request_body(args: &BenchArgs, prompt: String, max_tokens: u32) -> serde_json::Value {
    let mut body = match args.api {
        Api::Chat => serde_json::json!({"model": args.model, "messages": [{"role": "user", "content": prompt}]}),
        Api::Completions => serde_json::json!({"model": args.model, "prompt": prompt}),
    };
    body["max_tokens"] = max_tokens.into();
    body["stream"] = args.stream.into();
    body
}

/// Sends one request and measures it.
async fn one(http: &reqwest::Client, url: &str, body: serde_json::Value, run_start: Instant) -> Sample {
    let start = Instant::now();
    let mut sample = Sample {
        sent_at: (start - run_start).as_secs_f64(),
        ttft: None,
        gaps: Vec::new(),
        e2e: 0.0,
        output_tokens: 0,
        error: None,
        waited_for_cap: false,
    };
    let response = match http.post(url).json(&body).send().await {
        Ok(response) => response,
        Err(_) => {
            sample.error = Some("transport".into());
            sample.e2e = start.elapsed().as_secs_f64();
            return sample;
        }
    };
    if !response.status().is_success() {
        sample.error = Some(response.status().as_u16().to_string());
        let _ = response.bytes().await;
        sample.e2e = start.elapsed().as_secs_f64();
        return sample;
    }
    let mut last: Option<Instant> = None;
    let mut buffer = Vec::new();
    let mut bytes = response.bytes_stream();
    let mut finished = false;
    while let Some(chunk) = bytes.next().await {
        let Ok(chunk) = chunk else {
            sample.error = Some("transport".into());
            break;
        };
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim_end().strip_prefix("data: ") else {
                if line.starts_with("event: error") {
                    sample.error = Some("stream error".into());
                }
                continue;
            };
            if data == "[DONE]" {
                finished = true;
                continue;
            }
            let Ok(chunk) = serde_json::from_str::<serde_json::Value>(data) else {
                continue;
            };
            let choice = &chunk["choices"][0];
            let text = choice["delta"]["content"].as_str().or_else(|| choice["text"].as_str());
            if text.is_some_and(|t| !t.is_empty()) {
                let now = Instant::now();
                match last {
                    None => sample.ttft = Some((now - start).as_secs_f64()),
                    Some(previous) => sample.gaps.push((now - previous).as_secs_f64()),
                }
                last = Some(now);
                sample.output_tokens += 1;
            }
            if let Some(tokens) = chunk["usage"]["completion_tokens"].as_u64() {
                sample.output_tokens = tokens as u32;
            }
        }
    }
    sample.e2e = start.elapsed().as_secs_f64();
    if !args_streamed(&buffer, finished) && sample.error.is_none() && sample.ttft.is_none() {
        // A whole (non-streamed) answer: the body is one JSON document.
        match serde_json::from_slice::<serde_json::Value>(&buffer) {
            Ok(answer) => {
                sample.output_tokens = answer["usage"]["completion_tokens"].as_u64().unwrap_or(0) as u32;
                sample.ttft = Some(sample.e2e);
            }
            Err(_) => sample.error = Some("unreadable answer".into()),
        }
    }
    sample
}

/// True when the answer was SSE (it ended with `[DONE]`, or left no JSON body behind).
fn args_streamed(rest: &[u8], finished: bool) -> bool {
    finished || rest.iter().all(u8::is_ascii_whitespace)
}

/// Runs the load described by `args` and returns the report.
pub(crate) async fn run(args: &BenchArgs) -> Result<Report, String> {
    let path = match args.api {
        Api::Chat => "/v1/chat/completions",
        Api::Completions => "/v1/completions",
    };
    let url = format!("{}{path}", args.url.trim_end_matches('/'));
    if args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err("--rate must be a positive number of requests per second".into());
    }
    if args.concurrency == 0 || args.requests == 0 || args.max_in_flight == 0 {
        return Err("--concurrency, --requests and --max-in-flight must be at least 1".into());
    }
    if !(args.trace_speedup > 0.0 && args.trace_speedup.is_finite()) || args.trace_block_size == 0 {
        return Err("--trace-speedup must be a positive number and --trace-block-size at least 1".into());
    }
    // Read the whole trace once before sending anything, so a bad line fails
    // the run at once (with its line and field) instead of half-way through.
    let trace_len = match &args.trace {
        Some(path) => Some(for_each_trace_line(path, args.trace_block_size, |_| {})?),
        None => None,
    };
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = &args.api_key {
        let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|_| "--api-key holds characters a header cannot carry".to_string())?;
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .default_headers(headers)
        .build()
        .map_err(|e| e.to_string())?;
    let total = trace_len.unwrap_or(args.requests);
    let progress = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} requests  {per_sec}  eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    };
    let before = match args.worker_metrics.is_empty() {
        true => None,
        false => Some(prefix_cache_counters(&http, &args.worker_metrics).await?),
    };
    let mut rng = StdRng::seed_from_u64(args.seed);
    let deadline = args.duration.map(|d| Instant::now() + Duration::from_secs_f64(d));
    let run_start = Instant::now();
    let mut samples = Vec::with_capacity(total);
    let http = Arc::new(http);
    if let Some(path) = &args.trace {
        let mut open = OpenLoop::new(http.clone(), url.clone(), run_start, args.max_in_flight);
        // The file is read a second time, line by line, so memory does not
        // grow with the trace; the first pass proved every line good.
        let mut origin = None;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<TraceRequest>(64);
        let reader = {
            let path = path.clone();
            let block_size = args.trace_block_size;
            tokio::task::spawn_blocking(move || {
                for_each_trace_line(&path, block_size, |request| {
                    // The receiver only goes away when the run ends early.
                    let _ = tx.blocking_send(request);
                })
            })
        };
        while let Some(request) = rx.recv().await {
            let first = *origin.get_or_insert(request.timestamp_ms);
            let due = run_start + Duration::from_secs_f64((request.timestamp_ms - first) / 1000.0 / args.trace_speedup);
            if deadline.is_some_and(|d| due >= d) {
                break;
            }
            let body = request_body(
                args,
                prompt_text(&request, args.trace_block_size),
                request.output_length,
            );
            open.send_at(due, body, &mut samples, &progress).await;
        }
        drop(rx);
        reader
            .await
            .map_err(|e| format!("the trace reader failed: {e}"))?
            .map_err(|e| e.to_string())?;
        open.finish(&mut samples, &progress).await;
    } else {
        let bodies: Vec<serde_json::Value> = (0..args.requests)
            .map(|_| {
                let (p, o) = (args.prompt_tokens.draw(&mut rng), args.output_tokens.draw(&mut rng));
                body(args, p, o)
            })
            .collect();
        match args.rate {
            None => {
                let mut stream = futures::stream::iter(bodies)
                    .take_while(|_| futures::future::ready(deadline.is_none_or(|d| Instant::now() < d)))
                    .map(|body| {
                        let (http, url) = (http.clone(), url.clone());
                        async move { one(&http, &url, body, run_start).await }
                    })
                    .buffer_unordered(args.concurrency);
                while let Some(sample) = stream.next().await {
                    progress.inc(1);
                    samples.push(sample);
                }
            }
            Some(rate) => {
                let mut open = OpenLoop::new(http.clone(), url.clone(), run_start, args.max_in_flight);
                let mut next = Instant::now();
                for body in bodies {
                    if deadline.is_some_and(|d| next >= d) {
                        break;
                    }
                    open.send_at(next, body, &mut samples, &progress).await;
                    let gap: f64 = -(1.0 - rng.random::<f64>()).ln() / rate;
                    next += Duration::from_secs_f64(gap);
                }
                open.finish(&mut samples, &progress).await;
            }
        }
    }
    progress.finish_and_clear();
    let duration = run_start.elapsed().as_secs_f64();
    let hit_rate = match before {
        Some(before) => {
            // The workers refresh their counters at least once a second.
            tokio::time::sleep(Duration::from_millis(1100)).await;
            let after = prefix_cache_counters(&http, &args.worker_metrics).await?;
            let queries = after.0 - before.0;
            (queries > 0.0).then(|| (after.1 - before.1) / queries)
        }
        None => None,
    };
    let mut report = summarize(args, &samples, duration);
    report.prefix_cache_hit_rate = hit_rate;
    if let Some(dir) = &args.plot {
        plot_latency(dir, &samples).map_err(|e| format!("cannot write the plot into {}: {e}", dir.display()))?;
    }
    Ok(report)
}

/// Reads a trace file, hands each good request to `each` in order, and
/// returns how many there were; the first bad line (or a timestamp going
/// back in time) is an error naming it. Blank lines are skipped.
fn for_each_trace_line(
    path: &std::path::Path,
    block_size: u32,
    mut each: impl FnMut(TraceRequest),
) -> Result<usize, String> {
    use std::io::BufRead;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open the trace {}: {e}", path.display()))?;
    let mut count = 0;
    let mut last = 0.0;
    for (index, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| format!("cannot read the trace {}: {e}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let request = parse_line(&line, index + 1, block_size).map_err(|e| format!("{}: {e}", path.display()))?;
        if request.timestamp_ms < last {
            return Err(format!(
                "{}: trace line {}: timestamp: {} is before the previous line's {last} (a trace is in arrival order)",
                path.display(),
                index + 1,
                request.timestamp_ms
            ));
        }
        last = request.timestamp_ms;
        count += 1;
        each(request);
    }
    if count == 0 {
        return Err(format!("the trace {} has no requests", path.display()));
    }
    Ok(count)
}

/// Sum of `vllm:prefix_cache_queries_total` and `vllm:prefix_cache_hits_total`
/// (tokens) over the workers' metrics pages.
async fn prefix_cache_counters(http: &reqwest::Client, urls: &[String]) -> Result<(f64, f64), String> {
    let mut totals = (0.0, 0.0);
    for url in urls {
        let text = http
            .get(url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| format!("cannot read worker metrics at {url}: {e}"))?
            .text()
            .await
            .map_err(|e| format!("cannot read worker metrics at {url}: {e}"))?;
        totals.0 += metric_sum(&text, "vllm:prefix_cache_queries_total");
        totals.1 += metric_sum(&text, "vllm:prefix_cache_hits_total");
    }
    Ok(totals)
}

/// The sum of every sample of `name` (any labels) in a Prometheus text page.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let value = match rest.strip_prefix('{') {
                Some(labels) => labels.split_once('}')?.1,
                None => rest,
            };
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

/// An open loop: each request is sent at its time, on its own task, with at
/// most `max_in_flight` out; the tasks belong to the loop (a `JoinSet`), so
/// none outlives the run.
struct OpenLoop {
    http: Arc<reqwest::Client>,
    url: String,
    run_start: Instant,
    /// Caps what is in flight; a request due at the cap waits for a permit.
    permits: Arc<tokio::sync::Semaphore>,
    tasks: tokio::task::JoinSet<Sample>,
}

impl OpenLoop {
    fn new(http: Arc<reqwest::Client>, url: String, run_start: Instant, max_in_flight: usize) -> Self {
        Self {
            http,
            url,
            run_start,
            permits: Arc::new(tokio::sync::Semaphore::new(max_in_flight)),
            tasks: tokio::task::JoinSet::new(),
        }
    }

    /// Sends `body` at `due` (or as soon after as a permit frees), collecting
    /// what finished meanwhile.
    async fn send_at(
        &mut self,
        due: Instant,
        body: serde_json::Value,
        samples: &mut Vec<Sample>,
        progress: &indicatif::ProgressBar,
    ) {
        tokio::time::sleep_until(due).await;
        let (permit, waited) = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => (permit, false),
            Err(_) => {
                // The semaphore is never closed.
                let Ok(permit) = self.permits.clone().acquire_owned().await else {
                    return;
                };
                (permit, true)
            }
        };
        let (http, url, run_start) = (self.http.clone(), self.url.clone(), self.run_start);
        self.tasks.spawn(async move {
            let mut sample = one(&http, &url, body, run_start).await;
            sample.waited_for_cap = waited;
            drop(permit);
            sample
        });
        while let Some(done) = self.tasks.try_join_next() {
            if let Ok(sample) = done {
                progress.inc(1);
                samples.push(sample);
            }
        }
    }

    /// Waits for every request still out.
    async fn finish(mut self, samples: &mut Vec<Sample>, progress: &indicatif::ProgressBar) {
        while let Some(done) = self.tasks.join_next().await {
            if let Ok(sample) = done {
                progress.inc(1);
                samples.push(sample);
            }
        }
    }
}

/// Nearest-rank percentiles (5 % steps, and 99 %) of `values` seconds, in ms.
fn percentile_curve(mut values: Vec<f64>) -> Vec<(f64, f64)> {
    if values.is_empty() {
        return Vec::new();
    }
    values.sort_by(f64::total_cmp);
    (1..=19)
        .map(|k| f64::from(k) * 5.0)
        .chain([99.0])
        .map(|p| {
            let rank = ((values.len() as f64 * p / 100.0).ceil() as usize).clamp(1, values.len());
            (p, values[rank - 1] * 1000.0)
        })
        .collect()
}

fn summarize(args: &BenchArgs, samples: &[Sample], duration: f64) -> Report {
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.error.is_none()).collect();
    let mut errors = BTreeMap::new();
    for sample in samples {
        if let Some(error) = &sample.error {
            *errors.entry(error.clone()).or_insert(0) += 1;
        }
    }
    let tokens: u64 = ok.iter().map(|s| u64::from(s.output_tokens)).sum();
    Report {
        url: args.url.clone(),
        model: args.model.clone(),
        mode: match (&args.trace, args.rate) {
            (Some(path), _) => format!(
                "trace {} ×{}",
                path.file_name()
                    .map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned()),
                args.trace_speedup
            ),
            (None, Some(rate)) => format!("poisson {rate}/s"),
            (None, None) => format!("concurrency {}", args.concurrency),
        },
        requests: samples.len(),
        completed: ok.len(),
        errors,
        duration_s: duration,
        requests_per_s: ok.len() as f64 / duration,
        output_tokens_per_s: tokens as f64 / duration,
        ttft_ms: Quantiles::of(ok.iter().filter_map(|s| s.ttft).collect()),
        itl_ms: Quantiles::of(ok.iter().flat_map(|s| s.gaps.iter().copied()).collect()),
        e2e_ms: Quantiles::of(ok.iter().map(|s| s.e2e).collect()),
        refused_ms: Quantiles::of(samples.iter().filter(|s| s.error.is_some()).map(|s| s.e2e).collect()),
        waited_for_cap: samples.iter().filter(|s| s.waited_for_cap).count(),
        prefix_cache_hit_rate: None,
        ttft_curve_ms: percentile_curve(ok.iter().filter_map(|s| s.ttft).collect()),
    }
}

fn plot_latency(dir: &std::path::Path, samples: &[Sample]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut points: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.error.is_none())
        .map(|s| (s.sent_at, s.e2e * 1000.0))
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    let chart = Chart {
        title: "End-to-end latency over the run".into(),
        x_label: "sent at (s)".into(),
        y_label: "latency (ms)".into(),
        series: vec![Series {
            name: "request".into(),
            points,
            dots: true,
        }],
    };
    std::fs::write(dir.join("latency.svg"), chart.render())
}

/// `switchyard bench`: runs, prints the table, writes the files asked for.
pub(crate) async fn main(args: BenchArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let report = run(&args).await?;
    let table = report.markdown();
    print!("{table}");
    if let Some(path) = &args.markdown {
        std::fs::write(path, &table)?;
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_parse_with_clear_errors() {
        assert_eq!("64".parse::<Length>(), Ok(Length::Fixed(64)));
        assert_eq!("32-128".parse::<Length>(), Ok(Length::Uniform(32, 128)));
        assert!("0".parse::<Length>().unwrap_err().contains("positive"));
        assert!("9-3".parse::<Length>().unwrap_err().contains("low to high"));
        assert!("abc".parse::<Length>().unwrap_err().contains("\"abc\""));
    }

    #[test]
    fn quantiles_pick_the_nearest_rank() {
        let q = Quantiles::of((1..=100).map(|i| f64::from(i) / 1000.0).collect());
        assert_eq!((q.p50, q.p90, q.p99), (50.0, 90.0, 99.0));
        assert!((q.mean - 50.5).abs() < 1e-9);
    }
}
