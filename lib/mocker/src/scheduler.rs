//! vLLM-style continuous batching as a pure state machine: a FIFO waiting queue, a running set in
//! admission order, chunked prefill under a per-step token budget, and LIFO preemption when the KV
//! cache runs out. It never sleeps or awaits; the engine calls [`Scheduler::step`] and sleeps for the
//! duration it reports.
//!
//! Each step follows vLLM v1: running sequences are scheduled first (a decode costs one token of the
//! budget, an unfinished prefill takes the next chunk), then waiting sequences are admitted with what
//! is left. A sequence whose computed tokens catch up with its tokens samples one new token.

use std::collections::VecDeque;
use std::time::Duration;

use crate::config::MockerConfig;
use crate::kv_cache::{BlockHash, BlockId, KvCache, block_hashes, blocks_for};
use crate::text;
use crate::timing::PerfModel;

/// Identifies a sequence for its lifetime in the scheduler; never reused.
pub type SeqId = u64;

/// What one [`Scheduler::step`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StepOutcome {
    /// One generated token per sequence that sampled this step, in running order.
    pub tokens: Vec<(SeqId, u32)>,
    /// Sequences that reached `max_tokens` this step (their last token is in `tokens`); their blocks
    /// are already released.
    pub finished: Vec<SeqId>,
    /// Sequences sent back to the waiting queue to free memory; they keep their generated tokens.
    pub preempted: Vec<SeqId>,
    /// Prompt (or recomputed) tokens prefilled this step, summed over the batch.
    pub prefill_tokens: usize,
    /// All tokens computed this step (prefill chunks plus one per decoding sequence); at most
    /// `max_num_batched_tokens`.
    pub batched_tokens: usize,
    /// Tokens found in the prefix cache by sequences admitted this step.
    pub prefix_hit_tokens: usize,
    /// Tokens looked up in the prefix cache by sequences admitted this step (a preempted sequence
    /// looks all its tokens up again), so hits / queries is vLLM's prefix-cache hit rate.
    pub prefix_query_tokens: usize,
    /// Simulated time the step takes.
    pub duration: Duration,
}

#[derive(Debug)]
struct Sequence {
    id: SeqId,
    /// The prompt followed by every token generated so far; after preemption all of it is prefilled again.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// The fake model's state after `tokens`: it picks the next token.
    model: text::Greedy,
    /// Chained hashes of the prompt's full blocks; generated tokens' blocks stay private.
    prompt_hashes: Vec<BlockHash>,
    max_tokens: usize,
    blocks: Vec<BlockId>,
    /// Tokens whose KV is in `blocks`.
    computed: usize,
    /// Leading prompt blocks registered in the prefix cache (or found there).
    registered: usize,
    /// True from admission until the first token is sampled, so chunks count as prefill, not decode.
    prefilling: bool,
    /// Set while scheduling a step: the sequence has computed all its tokens and samples one.
    sampling: bool,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// The batching state machine; see the module docs.
#[derive(Debug)]
pub struct Scheduler {
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
    kv: KvCache,
    perf: PerfModel,
    waiting: VecDeque<Sequence>,
    /// In admission order, so the newest (the preemption victim) is at the back.
    running: Vec<Sequence>,
    next_id: SeqId,
}

impl Scheduler {
    /// An idle scheduler over an empty cache, shaped by a validated config.
    pub fn new(config: &MockerConfig) -> Self {
        Self {
            max_num_seqs: config.max_num_seqs,
            max_num_batched_tokens: config.max_num_batched_tokens,
            kv: KvCache::new(config.num_gpu_blocks, config.block_size, config.enable_prefix_caching),
            perf: PerfModel::from_config(config),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
        }
    }

    /// Queues a sequence. The caller has checked that `prompt` is non-empty, `max_tokens` is positive and
    /// that `prompt.len() + max_tokens` tokens fit in the whole cache; otherwise it could never finish.
    pub fn add(&mut self, prompt: Vec<u32>, max_tokens: usize) -> SeqId {
        debug_assert!(!prompt.is_empty() && max_tokens > 0);
        debug_assert!(blocks_for(prompt.len() + max_tokens, self.kv.block_size()) <= self.kv.num_blocks());
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.push_back(Sequence {
            id,
            prompt_len: prompt.len(),
            prompt_hashes: block_hashes(&prompt, self.kv.block_size()),
            model: text::Greedy::after(&prompt),
            tokens: prompt,
            max_tokens,
            blocks: Vec::new(),
            computed: 0,
            registered: 0,
            prefilling: true,
            sampling: false,
        });
        id
    }

    /// Removes a sequence wherever it is and frees its blocks at once. False if it is unknown (finished).
    pub fn cancel(&mut self, id: SeqId) -> bool {
        if let Some(index) = self.running.iter().position(|seq| seq.id == id) {
            let seq = self.running.remove(index);
            self.kv.release(&seq.blocks);
            return true;
        }
        if let Some(index) = self.waiting.iter().position(|seq| seq.id == id) {
            // Waiting sequences hold no blocks.
            self.waiting.remove(index);
            return true;
        }
        false
    }

    /// Sequences admitted and holding blocks.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Sequences queued (new or preempted).
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// The same scheduler, recording its cache's KV events (see [`KvCache::with_kv_events`]); call it
    /// before adding work.
    pub fn with_kv_events(mut self) -> Self {
        self.kv = self.kv.with_kv_events();
        self
    }

    /// The KV events recorded since the last call, oldest first; empty when events are off.
    pub fn take_kv_events(&mut self) -> Vec<switchyard_kv_router::events::KvEvent> {
        self.kv.take_kv_events()
    }

    /// The block manager, for load reporting.
    pub fn kv(&self) -> &KvCache {
        &self.kv
    }

    /// Advances the simulation by one forward pass. `None` when there is nothing to do, so the
    /// caller can wait for new work instead of spinning.
    pub fn step(&mut self) -> Option<StepOutcome> {
        if self.running.is_empty() && self.waiting.is_empty() {
            return None;
        }
        let mut out = StepOutcome::default();
        let mut budget = self.max_num_batched_tokens;
        self.schedule_running(&mut budget, &mut out);
        self.admit_waiting(&mut budget, &mut out);
        self.sample(&mut out);
        let decoded = !out.tokens.is_empty();
        out.duration = self.perf.step_duration(out.prefill_tokens, decoded, self.kv.usage());
        Some(out)
    }

    fn schedule_running(&mut self, budget: &mut usize, out: &mut StepOutcome) {
        for seq in &mut self.running {
            seq.sampling = false;
            if *budget > 0 {
                compute_chunk(&mut self.kv, seq, budget, out);
            }
        }
    }

    /// Admits from the head of the queue only (no skipping ahead), as vLLM does, so a large prompt is
    /// not starved by a stream of small ones.
    fn admit_waiting(&mut self, budget: &mut usize, out: &mut StepOutcome) {
        while *budget > 0 && self.running.len() < self.max_num_seqs {
            let Some(mut seq) = self.waiting.pop_front() else { break };
            let needed = blocks_for(seq.tokens.len(), self.kv.block_size());
            let Some(alloc) = self.kv.allocate(&seq.prompt_hashes, needed) else {
                self.waiting.push_front(seq);
                break;
            };
            // At least one token is always computed, so a fully cached prompt still samples.
            let cached = (alloc.cached_blocks * self.kv.block_size()).min(seq.tokens.len() - 1);
            out.prefix_hit_tokens += cached;
            out.prefix_query_tokens += seq.tokens.len();
            seq.blocks = alloc.blocks;
            seq.registered = alloc.cached_blocks;
            seq.computed = cached;
            seq.prefilling = true;
            compute_chunk(&mut self.kv, &mut seq, budget, out);
            self.running.push(seq);
        }
    }

    /// Every sequence that caught up samples one token. A sequence that will need the token's KV (it is
    /// not its last) first secures room for it, preempting the newest sequences if the cache is full.
    fn sample(&mut self, out: &mut StepOutcome) {
        let block_size = self.kv.block_size();
        let mut index = 0;
        while index < self.running.len() {
            let seq = &self.running[index];
            if !seq.sampling {
                index += 1;
                continue;
            }
            let is_last = seq.generated() + 1 == seq.max_tokens;
            if !is_last && blocks_for(seq.tokens.len() + 1, block_size) > seq.blocks.len() && !self.grow(index, out) {
                // The sequence preempted itself; `index` now points past the end.
                continue;
            }
            let seq = &mut self.running[index];
            let token = seq.model.next();
            seq.model.push(token);
            seq.tokens.push(token);
            seq.prefilling = false;
            out.tokens.push((seq.id, token));
            if is_last {
                let seq = self.running.remove(index);
                self.kv.release(&seq.blocks);
                out.finished.push(seq.id);
            } else {
                index += 1;
            }
        }
    }

    /// Adds one block to `running[index]`, preempting from the back until one is free. Returns false if
    /// the sequence itself had to be preempted. Cannot loop forever: once everything behind `index` is
    /// gone, the sequence preempts itself.
    fn grow(&mut self, index: usize, out: &mut StepOutcome) -> bool {
        loop {
            if let Some(block) = self.kv.allocate_one() {
                self.running[index].blocks.push(block);
                return true;
            }
            let mut victim = self.running.pop().expect("running holds at least `index`");
            let was_self = self.running.len() == index;
            tracing::debug!(seq = victim.id, "preempting a sequence: KV cache is full");
            self.kv.release(&victim.blocks);
            victim.blocks.clear();
            victim.computed = 0;
            victim.registered = 0;
            victim.sampling = false;
            out.preempted.push(victim.id);
            // Popped newest first, so pushing each to the front keeps the original admission order.
            self.waiting.push_front(victim);
            if was_self {
                return false;
            }
        }
    }
}

/// Computes the next chunk of `seq`'s uncomputed tokens within the budget, registers the prompt blocks it
/// completes in the prefix cache, and marks the sequence for sampling if it caught up.
fn compute_chunk(kv: &mut KvCache, seq: &mut Sequence, budget: &mut usize, out: &mut StepOutcome) {
    let chunk = (seq.tokens.len() - seq.computed).min(*budget);
    *budget -= chunk;
    out.batched_tokens += chunk;
    seq.computed += chunk;
    if seq.prefilling {
        out.prefill_tokens += chunk;
    }
    let block_size = kv.block_size();
    let first = seq.registered;
    let end = seq.prompt_hashes.len().min(seq.computed / block_size);
    if end > first {
        // One call for the whole run, so a listener gets one `BlockStored` per chunk as from vLLM.
        let parent = first.checked_sub(1).map(|i| seq.prompt_hashes[i]);
        kv.register(
            &seq.blocks[first..end],
            &seq.prompt_hashes[first..end],
            parent,
            &seq.tokens[first * block_size..end * block_size],
        );
        seq.registered = end;
    }
    seq.sampling = seq.computed == seq.tokens.len();
}

#[cfg(test)]
mod tests;
