//! The choice of a worker for one request: a cost per candidate from its
//! cached overlap and its predicted load, then an argmin or a softmax draw.
//! Pure: the caller passes the candidates (with the router's own load
//! prediction), the overlaps and a random number; nothing here keeps state.
//!
//! Cost, in blocks (lower is better), Dynamo's formula:
//!
//! ```text
//! prefill = max(active_prefill + request_blocks − overlap_credit × overlap, 0)
//! decode  = active_decode + request_blocks
//! cost    = prefill_scale × prefill + decode
//! ```

use crate::worker::WorkerId;
use std::fmt;

/// How costs are weighed and how the choice is made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostConfig {
    /// Blocks of prefill saved per cached block; 0 routes on load alone.
    pub overlap_credit: f64,
    /// Weight of prefill work against decode work.
    pub prefill_scale: f64,
    /// 0 picks the cheapest; above 0 draws with `p ∝ exp(−normalised cost / T)`.
    pub temperature: f64,
}

impl Default for CostConfig {
    fn default() -> Self {
        CostConfig {
            overlap_credit: 1.0,
            prefill_scale: 1.0,
            temperature: 0.0,
        }
    }
}

/// A [`CostConfig`] field that is negative or not a number.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("{field} must be a finite number ≥ 0, not {value}")]
pub struct InvalidCostConfig {
    pub field: &'static str,
    pub value: f64,
}

impl CostConfig {
    /// Checks every field is finite and ≥ 0.
    pub fn validate(&self) -> Result<(), InvalidCostConfig> {
        for (field, value) in [
            ("overlap_credit", self.overlap_credit),
            ("prefill_scale", self.prefill_scale),
            ("temperature", self.temperature),
        ] {
            if !value.is_finite() || value < 0.0 {
                return Err(InvalidCostConfig { field, value });
            }
        }
        Ok(())
    }
}

/// One worker the request may go to, as the router sees it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub worker: WorkerId,
    /// Leading blocks of the request it holds (from the indexes).
    pub overlap_blocks: u32,
    /// Blocks of prefill routed to it and not yet done (predicted).
    pub active_prefill_blocks: u64,
    /// Blocks of requests it is decoding (predicted).
    pub active_decode_blocks: u64,
    /// Blocks in its cache, for breaking ties towards the emptier one.
    pub cached_blocks: u64,
}

/// A candidate with its cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub worker: WorkerId,
    pub overlap_blocks: u32,
    pub cost: f64,
}

/// The decision and why: the chosen worker and the cheapest other one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    pub chosen: Scored,
    pub runner_up: Option<Scored>,
}

impl fmt::Display for Choice {
    /// The `x-switchyard-route` header value, e.g.
    /// `worker=1f;overlap=12;cost=140;runner_up=2a;runner_up_overlap=0;runner_up_cost=152`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.chosen;
        write!(f, "worker={};overlap={};cost={}", c.worker, c.overlap_blocks, c.cost)?;
        if let Some(r) = &self.runner_up {
            write!(
                f,
                ";runner_up={};runner_up_overlap={};runner_up_cost={}",
                r.worker, r.overlap_blocks, r.cost
            )?;
        }
        Ok(())
    }
}

/// The cost of sending a request of `request_blocks` blocks to `candidate`.
pub fn cost(config: &CostConfig, request_blocks: u64, candidate: &Candidate) -> f64 {
    let prefill = (candidate.active_prefill_blocks as f64 + request_blocks as f64
        - config.overlap_credit * f64::from(candidate.overlap_blocks))
    .max(0.0);
    let decode = (candidate.active_decode_blocks + request_blocks) as f64;
    config.prefill_scale * prefill + decode
}

/// Picks a worker for a request of `request_blocks` blocks; `None` when
/// there are no candidates. `random` is a uniform draw in `[0, 1)` from the
/// caller (so tests are deterministic): it breaks ties at temperature 0 and
/// drives the draw above 0.
///
/// At temperature 0 the cheapest wins; among equal costs the smallest
/// cache, then `random`. Above 0, costs are normalised to `[0, 1]` and a
/// worker is drawn with probability ∝ `exp(−normalised / temperature)`.
pub fn select(config: &CostConfig, request_blocks: u64, candidates: &[Candidate], random: f64) -> Option<Choice> {
    let costs: Vec<f64> = candidates.iter().map(|c| cost(config, request_blocks, c)).collect();
    let chosen = if config.temperature > 0.0 {
        draw(&costs, config.temperature, random)?
    } else {
        cheapest(candidates, &costs, random)?
    };
    let scored = |i: usize| Scored {
        worker: candidates[i].worker,
        overlap_blocks: candidates[i].overlap_blocks,
        cost: costs[i],
    };
    let runner_up = (0..candidates.len())
        .filter(|i| *i != chosen)
        .min_by(|a, b| costs[*a].total_cmp(&costs[*b]));
    Some(Choice {
        chosen: scored(chosen),
        runner_up: runner_up.map(scored),
    })
}

fn cheapest(candidates: &[Candidate], costs: &[f64], random: f64) -> Option<usize> {
    let min = costs.iter().copied().min_by(f64::total_cmp)?;
    // Costs are sums of whole blocks times the config's factors: equal
    // within rounding is a tie.
    let tied = |i: &usize| costs[*i] - min <= 1e-9 * min.abs().max(1.0);
    let smallest_cache = (0..costs.len())
        .filter(tied)
        .map(|i| candidates[i].cached_blocks)
        .min()?;
    let finalists: Vec<usize> = (0..costs.len())
        .filter(|i| tied(i) && candidates[*i].cached_blocks == smallest_cache)
        .collect();
    Some(finalists[pick(random, finalists.len())])
}

fn draw(costs: &[f64], temperature: f64, random: f64) -> Option<usize> {
    let min = costs.iter().copied().min_by(f64::total_cmp)?;
    let max = costs.iter().copied().max_by(f64::total_cmp)?;
    let span = max - min;
    let weights: Vec<f64> = costs
        .iter()
        .map(|c| {
            let normalised = if span > 0.0 { (c - min) / span } else { 0.0 };
            (-normalised / temperature).exp()
        })
        .collect();
    let total: f64 = weights.iter().sum();
    let mut target = random.clamp(0.0, 1.0) * total;
    for (i, weight) in weights.iter().enumerate() {
        if target < *weight {
            return Some(i);
        }
        target -= weight;
    }
    Some(costs.len() - 1) // rounding left `target` just above the last weight
}

/// An index in `0..n` from a uniform draw in `[0, 1)`.
fn pick(random: f64, n: usize) -> usize {
    ((random.clamp(0.0, 1.0) * n as f64) as usize).min(n - 1)
}

#[cfg(test)]
mod tests;
