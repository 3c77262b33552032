//! How long a simulated step takes: Dynamo's default polynomial perf model, fitted to a real GPU.
//!
//! Pure arithmetic; it never sleeps. The engine sleeps for whatever [`PerfModel::step_duration`] returns.

use std::time::Duration;

use crate::config::MockerConfig;

/// Milliseconds to prefill `new_tokens` uncached prompt tokens in one step (summed over the batch).
///
/// The constant term is the fixed cost of a forward pass, which is why batching prefills pays off.
pub fn prefill_ms(new_tokens: usize) -> f64 {
    let n = new_tokens as f64;
    4.209989e-07 * n * n + 1.518344e-02 * n + 16.50142
}

/// Milliseconds for one decode step when `kv_usage` (active KV tokens / total KV tokens) of the cache is
/// in use: attention cost grows with the KV read per step. Clamped to at least 1 ms as in Dynamo.
pub fn decode_ms(kv_usage: f64) -> f64 {
    let u = kv_usage.clamp(0.0, 1.0);
    (-25.74 * u * u + 54.01 * u + 5.74).max(1.0)
}

/// The timing model with the configured speed-ups applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerfModel {
    speedup_ratio: f64,
    decode_speedup_ratio: f64,
}

impl PerfModel {
    /// `speedup_ratio` 0 means every step takes no time; `decode_speedup_ratio` must be positive
    /// (see [`MockerConfig::validate`]).
    pub fn new(speedup_ratio: f64, decode_speedup_ratio: f64) -> Self {
        Self {
            speedup_ratio,
            decode_speedup_ratio,
        }
    }

    /// The model described by a (validated) config.
    pub fn from_config(config: &MockerConfig) -> Self {
        Self::new(config.speedup_ratio, config.decode_speedup_ratio)
    }

    /// Duration of one step that prefilled `prefill_tokens` new tokens and, if `decoded`, sampled tokens
    /// with `kv_usage` of the cache active. A step doing both pays both; a step doing neither is free.
    pub fn step_duration(&self, prefill_tokens: usize, decoded: bool, kv_usage: f64) -> Duration {
        if self.speedup_ratio == 0.0 {
            return Duration::ZERO;
        }
        let mut ms = 0.0;
        if prefill_tokens > 0 {
            ms += prefill_ms(prefill_tokens);
        }
        if decoded {
            ms += decode_ms(kv_usage) / self.decode_speedup_ratio;
        }
        Duration::from_secs_f64(ms / self.speedup_ratio / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_close(actual: f64, expected: f64) {
        assert!((actual - expected).abs() < 1e-6, "expected {expected}, got {actual}");
    }

    #[test]
    fn prefill_follows_the_polynomial() {
        assert_close(prefill_ms(0), 16.50142);
        // 4.209989e-7 * 1e6 + 1.518344e-2 * 1000 + 16.50142
        assert_close(prefill_ms(1000), 0.4209989 + 15.18344 + 16.50142);
        assert_close(
            prefill_ms(8192),
            4.209989e-07 * 8192.0 * 8192.0 + 1.518344e-02 * 8192.0 + 16.50142,
        );
    }

    #[test]
    fn decode_follows_the_polynomial_and_is_at_least_one_ms() {
        assert_close(decode_ms(0.0), 5.74);
        assert_close(decode_ms(0.5), -25.74 * 0.25 + 54.01 * 0.5 + 5.74);
        assert_close(decode_ms(1.0), -25.74 + 54.01 + 5.74);
        // Out-of-range usage is clamped rather than extrapolated into negative times.
        assert_close(decode_ms(7.0), decode_ms(1.0));
        assert!(decode_ms(-3.0) >= 1.0);
    }

    #[test]
    fn a_step_that_prefills_and_decodes_pays_both() {
        let model = PerfModel::new(1.0, 1.0);
        let both = model.step_duration(100, true, 0.5).as_secs_f64() * 1000.0;
        assert_close(both, prefill_ms(100) + decode_ms(0.5));
        assert_eq!(model.step_duration(0, false, 0.5), Duration::ZERO);
    }

    #[test]
    fn speedup_two_halves_the_delay_and_decode_speedup_only_touches_decode() {
        let model = PerfModel::new(2.0, 4.0);
        let prefill_only = model.step_duration(1000, false, 0.0).as_secs_f64() * 1000.0;
        assert_close(prefill_only, prefill_ms(1000) / 2.0);
        let decode_only = model.step_duration(0, true, 0.25).as_secs_f64() * 1000.0;
        assert_close(decode_only, decode_ms(0.25) / 4.0 / 2.0);
    }

    #[test]
    fn speedup_zero_never_sleeps() {
        let model = PerfModel::new(0.0, 1.0);
        assert_eq!(model.step_duration(8192, true, 1.0), Duration::ZERO);
    }
}
