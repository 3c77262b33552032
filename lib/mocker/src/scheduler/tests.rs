use std::collections::HashMap;

use super::*;

fn config(
    num_gpu_blocks: usize,
    block_size: usize,
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
) -> MockerConfig {
    MockerConfig {
        num_gpu_blocks,
        block_size,
        max_num_seqs,
        max_num_batched_tokens,
        ..MockerConfig::default()
    }
}

fn prompt(len: usize, first: u32) -> Vec<u32> {
    (first..first + len as u32).collect()
}

/// The `count` tokens the fake model generates after `prompt`, step by step.
fn greedy_answer(prompt: &[u32], count: usize) -> Vec<u32> {
    let mut model = text::Greedy::after(prompt);
    (0..count)
        .map(|_| {
            let token = model.next();
            model.push(token);
            token
        })
        .collect()
}

/// Steps until idle (with a safety limit), collecting every sequence's tokens and all outcomes.
fn run_to_idle(scheduler: &mut Scheduler) -> (HashMap<SeqId, Vec<u32>>, Vec<StepOutcome>) {
    let mut tokens: HashMap<SeqId, Vec<u32>> = HashMap::new();
    let mut steps = Vec::new();
    while let Some(out) = scheduler.step() {
        for &(id, token) in &out.tokens {
            tokens.entry(id).or_default().push(token);
        }
        steps.push(out);
        assert!(steps.len() < 10_000, "the scheduler made no progress");
    }
    (tokens, steps)
}

#[test]
fn an_idle_scheduler_has_nothing_to_do() {
    let mut scheduler = Scheduler::new(&MockerConfig::default());
    assert_eq!(scheduler.step(), None);
}

#[test]
fn a_sequence_prefills_then_emits_exactly_max_tokens_and_frees_its_blocks() {
    let mut scheduler = Scheduler::new(&config(16, 4, 8, 64));
    let id = scheduler.add(prompt(10, 1), 5);
    let first = scheduler.step().expect("work");
    assert_eq!(first.prefill_tokens, 10);
    assert_eq!(
        first.tokens.len(),
        1,
        "the step that completes a prefill samples the first token"
    );

    let (tokens, steps) = run_to_idle(&mut scheduler);
    let expected = greedy_answer(&prompt(10, 1), 5);
    assert_eq!(first.tokens, vec![(id, expected[0])]);
    assert_eq!(tokens[&id], expected[1..]);
    assert_eq!(steps.last().map(|s| s.finished.clone()), Some(vec![id]));
    assert!(
        steps.iter().all(|s| s.prefill_tokens == 0),
        "decode steps prefill nothing"
    );
    assert_eq!(scheduler.kv().active_blocks(), 0);
    assert_eq!(
        scheduler.kv().inactive_blocks(),
        2,
        "the two full prompt blocks stay cached"
    );
}

#[test]
fn at_most_max_num_seqs_run_at_once() {
    let mut scheduler = Scheduler::new(&config(64, 4, 2, 64));
    for i in 0..5 {
        scheduler.add(prompt(3, 100 * i), 4);
    }
    scheduler.step();
    assert_eq!((scheduler.num_running(), scheduler.num_waiting()), (2, 3));
    let mut finished = 0;
    while let Some(out) = scheduler.step() {
        assert!(scheduler.num_running() <= 2);
        finished += out.finished.len();
    }
    assert_eq!(finished, 5);
}

#[test]
fn each_step_stays_within_the_batched_token_budget() {
    let mut scheduler = Scheduler::new(&config(64, 4, 16, 8));
    for i in 0..4 {
        scheduler.add(prompt(6, 100 * i), 3);
    }
    let first = scheduler.step().expect("work");
    assert_eq!(
        first.prefill_tokens, 8,
        "the second prompt gets the 2 leftover tokens as a chunk"
    );
    assert_eq!(first.batched_tokens, 8);
    assert_eq!(scheduler.num_running(), 2);
    let (_, steps) = run_to_idle(&mut scheduler);
    assert!(
        steps.iter().any(|s| s.batched_tokens == 8),
        "the budget is used fully when there is work"
    );
    for step in &steps {
        assert!(step.batched_tokens <= 8, "{step:?}");
    }
}

#[test]
fn a_prompt_longer_than_the_budget_is_prefilled_in_chunks() {
    let mut scheduler = Scheduler::new(&config(64, 4, 16, 8));
    let id = scheduler.add(prompt(20, 1), 2);
    let chunks: Vec<(usize, usize)> = (0..3)
        .map(|_| scheduler.step().expect("work"))
        .map(|s| (s.prefill_tokens, s.tokens.len()))
        .collect();
    assert_eq!(
        chunks,
        [(8, 0), (8, 0), (4, 1)],
        "tokens only after the whole prompt is prefilled"
    );
    let last = scheduler.step().expect("work");
    assert_eq!(last.finished, [id]);
}

#[test]
fn a_shared_prefix_is_not_prefilled_twice() {
    let mut scheduler = Scheduler::new(&config(64, 4, 16, 64));
    scheduler.add(prompt(10, 1), 1);
    run_to_idle(&mut scheduler);

    let mut second = prompt(8, 1);
    second.extend([77, 78, 79]);
    scheduler.add(second, 1);
    let out = scheduler.step().expect("work");
    assert_eq!(out.prefix_hit_tokens, 8, "two full blocks of 4 are reused");
    assert_eq!(out.prefix_query_tokens, 11, "the whole prompt was looked up");
    assert_eq!(out.prefill_tokens, 3);
}

#[test]
fn memory_pressure_preempts_the_newest_and_every_sequence_still_completes() {
    // 8 blocks of 4 tokens; each sequence grows to 4 + 16 = 20 tokens (5 blocks), so three cannot coexist.
    let mut scheduler = Scheduler::new(&config(8, 4, 8, 64));
    let prompts: Vec<Vec<u32>> = (0..3).map(|i| prompt(4, 100 * i)).collect();
    let ids: Vec<SeqId> = prompts.iter().map(|p| scheduler.add(p.clone(), 16)).collect();
    let (tokens, steps) = run_to_idle(&mut scheduler);

    let preempted: Vec<SeqId> = steps.iter().flat_map(|s| s.preempted.clone()).collect();
    assert!(!preempted.is_empty(), "the cache is too small for all three at once");
    assert!(
        !preempted.contains(&ids[0]),
        "the oldest sequence is never the victim while others run"
    );
    for (id, prompt) in ids.iter().zip(&prompts) {
        let expected = greedy_answer(prompt, 16);
        assert_eq!(tokens[id], expected, "sequence {id} resumes where it was preempted");
    }
    assert!(
        steps.iter().any(|s| s.prefill_tokens > 4),
        "a preempted sequence recomputes prompt + output"
    );
    assert_eq!(scheduler.kv().active_blocks(), 0);
}

#[test]
fn a_preempted_sequence_goes_back_to_the_front_of_the_queue() {
    let mut scheduler = Scheduler::new(&config(2, 2, 8, 64));
    let a = scheduler.add(vec![1, 2], 2);
    let b = scheduler.add(vec![3, 4], 2);
    let c = scheduler.add(vec![5, 6], 2);
    // Step 1: a and b fill both blocks; both sample and need a second block, so b is preempted for a.
    let out = scheduler.step().expect("work");
    assert_eq!(out.preempted, [b]);
    assert_eq!(scheduler.waiting.iter().map(|s| s.id).collect::<Vec<_>>(), [b, c]);
    let (_, steps) = run_to_idle(&mut scheduler);
    let finished: Vec<SeqId> = steps.iter().flat_map(|s| s.finished.clone()).collect();
    assert_eq!(finished, [a, b, c]);
}

#[test]
fn cancelling_frees_blocks_immediately() {
    let mut scheduler = Scheduler::new(&config(16, 4, 8, 64));
    let running = scheduler.add(prompt(9, 1), 50);
    scheduler.step();
    assert_eq!(scheduler.kv().active_blocks(), 3);
    let waiting = scheduler.add(prompt(4, 500), 5);

    assert!(scheduler.cancel(running));
    assert_eq!(scheduler.kv().active_blocks(), 0);
    assert_eq!(scheduler.num_running(), 0);
    assert!(scheduler.cancel(waiting));
    assert_eq!(scheduler.num_waiting(), 0);
    assert!(!scheduler.cancel(running), "a second cancel finds nothing");
    assert_eq!(scheduler.step(), None);
}

#[test]
fn step_duration_uses_the_perf_model() {
    let mut scheduler = Scheduler::new(&config(16, 4, 8, 64));
    scheduler.add(prompt(10, 1), 2);
    let out = scheduler.step().expect("work");
    let model = PerfModel::from_config(&config(16, 4, 8, 64));
    assert_eq!(out.duration, model.step_duration(10, true, scheduler.kv().usage()));

    let mut instant = Scheduler::new(&MockerConfig {
        speedup_ratio: 0.0,
        ..config(16, 4, 8, 64)
    });
    instant.add(prompt(10, 1), 2);
    assert_eq!(instant.step().map(|s| s.duration), Some(Duration::ZERO));
}

#[test]
fn kv_events_replayed_each_step_mirror_the_cache_through_chunking_preemption_and_cancels() {
    use crate::kv_cache::replay::Replay;

    const PREFIXES: [&[u32]; 3] = [&[], &[9, 9, 9, 9, 8, 8, 8, 8], &[9, 9, 9, 9, 7, 7, 7, 7, 6, 6, 6, 6]];
    let mut preempted = 0;
    for seed in 0..60 {
        let mut state = seed;
        let mut below = |n: usize| {
            state = crate::hash::mix(state);
            (state % n as u64) as usize
        };
        // 16 blocks of 4 tokens and a 12-token budget: prompts are chunked, the cache fills and
        // sequences get preempted and prefilled again.
        let mut scheduler = Scheduler::new(&config(16, 4, 4, 12)).with_kv_events();
        let mut replay = Replay::new(4);
        let mut ids = Vec::new();
        let mut prompts = Vec::new();
        for _ in 0..300 {
            if below(3) == 0 {
                let mut prompt = PREFIXES[below(PREFIXES.len())].to_vec();
                let tail = 1 + below(12);
                prompt.extend((0..tail).map(|_| 1 + below(3) as u32));
                prompts.push(prompt.clone());
                ids.push(scheduler.add(prompt, 1 + below(12)));
            }
            if below(12) == 0 && !ids.is_empty() {
                scheduler.cancel(ids.swap_remove(below(ids.len())));
            }
            if let Some(out) = scheduler.step() {
                preempted += out.preempted.len();
            }
            replay.apply(&scheduler.take_kv_events());
            replay.assert_mirrors(scheduler.kv());
        }
        for prompt in &prompts {
            let cached = scheduler.kv().cached_prefix(&block_hashes(prompt, 4));
            assert_eq!(replay.matched_blocks(prompt), cached, "seed {seed}: {prompt:?}");
        }
    }
    assert!(preempted > 0, "the workload should preempt");
}

#[test]
fn a_scheduler_without_kv_events_records_none() {
    let mut scheduler = Scheduler::new(&config(16, 4, 8, 64));
    scheduler.add(prompt(20, 1), 4);
    run_to_idle(&mut scheduler);
    assert!(scheduler.kv().registered_blocks() > 0);
    assert!(scheduler.take_kv_events().is_empty());
}
