//! The cost formula, the choice at temperature 0 and above, and the hot
//! prefix that must not collapse onto one worker.

use super::*;

fn candidate(id: u64, overlap: u32, prefill: u64, decode: u64) -> Candidate {
    Candidate {
        worker: WorkerId::from(id),
        overlap_blocks: overlap,
        active_prefill_blocks: prefill,
        active_decode_blocks: decode,
        cached_blocks: 0,
    }
}

#[test]
fn cost_follows_the_formula_and_floors_prefill_at_zero() {
    let config = CostConfig {
        overlap_credit: 1.0,
        prefill_scale: 2.0,
        temperature: 0.0,
    };
    // prefill = 5 + 10 − 4 = 11, decode = 3 + 10 = 13, cost = 2 × 11 + 13
    assert_eq!(cost(&config, 10, &candidate(1, 4, 5, 3)), 35.0);
    // A credit larger than the work floors prefill at 0.
    let generous = CostConfig {
        overlap_credit: 10.0,
        ..config
    };
    assert_eq!(cost(&generous, 10, &candidate(1, 4, 0, 0)), 10.0);
}

#[test]
fn the_warm_worker_wins_when_loads_are_equal() {
    let candidates = [candidate(1, 0, 0, 0), candidate(2, 8, 0, 0), candidate(3, 2, 0, 0)];
    let choice = select(&CostConfig::default(), 10, &candidates, 0.5).unwrap();
    assert_eq!(choice.chosen.worker, WorkerId::from(2));
    assert_eq!(choice.chosen.cost, 12.0);
    let runner_up = choice.runner_up.unwrap();
    assert_eq!((runner_up.worker, runner_up.cost), (WorkerId::from(3), 18.0));
}

#[test]
fn a_busy_warm_worker_loses_to_an_idle_cold_one() {
    let candidates = [candidate(1, 0, 0, 0), candidate(2, 8, 20, 20)];
    let choice = select(&CostConfig::default(), 10, &candidates, 0.5).unwrap();
    assert_eq!(choice.chosen.worker, WorkerId::from(1));
}

#[test]
fn without_credit_only_load_counts() {
    let config = CostConfig {
        overlap_credit: 0.0,
        ..CostConfig::default()
    };
    let candidates = [candidate(1, 0, 0, 1), candidate(2, 8, 0, 2)];
    assert_eq!(
        select(&config, 10, &candidates, 0.5).unwrap().chosen.worker,
        WorkerId::from(1)
    );
}

#[test]
fn ties_go_to_the_smaller_cache_then_to_the_random_draw() {
    let mut candidates = [candidate(1, 0, 0, 0), candidate(2, 0, 0, 0), candidate(3, 0, 0, 0)];
    candidates[0].cached_blocks = 50;
    candidates[1].cached_blocks = 10;
    candidates[2].cached_blocks = 10;
    let config = CostConfig::default();
    assert_eq!(
        select(&config, 4, &candidates, 0.0).unwrap().chosen.worker,
        WorkerId::from(2)
    );
    assert_eq!(
        select(&config, 4, &candidates, 0.99).unwrap().chosen.worker,
        WorkerId::from(3)
    );
}

#[test]
fn no_candidates_no_choice() {
    assert_eq!(select(&CostConfig::default(), 4, &[], 0.5), None);
}

#[test]
fn temperature_draws_in_proportion_to_exp_of_minus_normalised_cost() {
    let config = CostConfig {
        temperature: 0.5,
        ..CostConfig::default()
    };
    let candidates = [candidate(1, 0, 0, 0), candidate(2, 0, 30, 0)];
    let draws = 10_000;
    let cheap = (0..draws)
        .filter(|i| {
            let random = (*i as f64 + 0.5) / draws as f64;
            select(&config, 10, &candidates, random).unwrap().chosen.worker == WorkerId::from(1)
        })
        .count();
    // Normalised costs 0 and 1: p(cheap) = 1 / (1 + e^(−1/0.5)).
    let expected = 1.0 / (1.0 + (-2.0f64).exp());
    assert!((cheap as f64 / draws as f64 - expected).abs() < 0.001, "{cheap}");
}

#[test]
fn equal_costs_at_temperature_are_drawn_uniformly() {
    let config = CostConfig {
        temperature: 1.0,
        ..CostConfig::default()
    };
    let candidates = [candidate(1, 0, 0, 0), candidate(2, 0, 0, 0)];
    assert_eq!(
        select(&config, 1, &candidates, 0.49).unwrap().chosen.worker,
        WorkerId::from(1)
    );
    assert_eq!(
        select(&config, 1, &candidates, 0.51).unwrap().chosen.worker,
        WorkerId::from(2)
    );
}

#[test]
fn the_choice_prints_as_a_route_header() {
    let candidates = [candidate(0x1f, 3, 0, 0), candidate(0x2a, 0, 0, 0)];
    let choice = select(&CostConfig::default(), 4, &candidates, 0.0).unwrap();
    assert_eq!(
        choice.to_string(),
        "worker=1f;overlap=3;cost=5;runner_up=2a;runner_up_overlap=0;runner_up_cost=8"
    );
}

#[test]
fn invalid_configs_name_the_field() {
    assert_eq!(CostConfig::default().validate(), Ok(()));
    let bad = CostConfig {
        temperature: -1.0,
        ..CostConfig::default()
    };
    assert_eq!(
        bad.validate(),
        Err(InvalidCostConfig {
            field: "temperature",
            value: -1.0
        })
    );
    let nan = CostConfig {
        prefill_scale: f64::NAN,
        ..CostConfig::default()
    };
    assert_eq!(nan.validate().unwrap_err().field, "prefill_scale");
}

/// One very hot prefix (90 of every request's 100 blocks), held at first by
/// worker 0 only. The router's predicted load grows with every request it
/// sends (nothing completes), and a worker that receives the prefix caches
/// it. Prefix-only routing would send everything to worker 0; the cost
/// spreads the requests over every worker.
#[test]
fn a_hot_prefix_spreads_over_workers_as_the_warm_one_fills() {
    let (request_blocks, hot_prefix, workers, requests) = (100u64, 90u32, 4usize, 40usize);
    let mut fleet: Vec<Candidate> = (0..workers as u64).map(|id| candidate(id, 0, 0, 0)).collect();
    fleet[0].overlap_blocks = hot_prefix;
    let mut sent = vec![0usize; workers];
    for i in 0..requests {
        let choice = select(&CostConfig::default(), request_blocks, &fleet, (i as f64 * 0.618) % 1.0).unwrap();
        let w = fleet.iter().position(|c| c.worker == choice.chosen.worker).unwrap();
        sent[w] += 1;
        let chosen = &mut fleet[w];
        chosen.active_prefill_blocks += request_blocks - u64::from(chosen.overlap_blocks);
        chosen.active_decode_blocks += request_blocks;
        chosen.overlap_blocks = hot_prefix;
    }
    assert_eq!(
        sent[0],
        sent.iter().copied().max().unwrap(),
        "the warm worker stays the busiest: {sent:?}"
    );
    assert!(
        sent.iter().all(|n| *n >= requests / workers / 2),
        "every worker takes a share: {sent:?}"
    );
    assert!(sent[0] <= requests / 2, "no collapse onto the warm worker: {sent:?}");
}
