//! The mocker's settings as one validated value; it parses nothing and reads no environment, so
//! whoever owns configuration (CLI, files) builds a [`MockerConfig`] and passes it in.

/// Shape and speed of the simulated engine. Defaults mirror Dynamo's mocker (and vLLM's defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct MockerConfig {
    /// Number of KV cache blocks on the simulated GPU.
    pub num_gpu_blocks: usize,
    /// Tokens per KV block; also the granularity of prefix reuse.
    pub block_size: usize,
    /// Most sequences running (holding KV blocks) at once.
    pub max_num_seqs: usize,
    /// Token budget of one scheduler step (prefill chunks plus one token per decoding sequence).
    pub max_num_batched_tokens: usize,
    /// Whether full prompt blocks are kept and reused across requests that share a prefix.
    pub enable_prefix_caching: bool,
    /// Simulated delays are divided by this; 0 means never sleep (as fast as the CPU allows).
    pub speedup_ratio: f64,
    /// Decode time is additionally divided by this.
    pub decode_speedup_ratio: f64,
}

impl Default for MockerConfig {
    fn default() -> Self {
        Self {
            num_gpu_blocks: 16384,
            block_size: 64,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            enable_prefix_caching: true,
            speedup_ratio: 1.0,
            decode_speedup_ratio: 1.0,
        }
    }
}

/// A setting that cannot describe a working engine.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// A count that must be positive was zero.
    #[error("{field} must be at least 1 (got 0)")]
    Zero {
        /// The offending field's name, as written in [`MockerConfig`].
        field: &'static str,
    },
    /// `speedup_ratio` was negative, NaN or infinite.
    #[error("speedup_ratio must be a finite number >= 0, where 0 disables sleeping (got {0})")]
    SpeedupRatio(f64),
    /// `decode_speedup_ratio` was zero, negative, NaN or infinite.
    #[error("decode_speedup_ratio must be a finite number > 0 (got {0})")]
    DecodeSpeedupRatio(f64),
}

impl MockerConfig {
    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let counts = [
            ("num_gpu_blocks", self.num_gpu_blocks),
            ("block_size", self.block_size),
            ("max_num_seqs", self.max_num_seqs),
            ("max_num_batched_tokens", self.max_num_batched_tokens),
        ];
        if let Some((field, _)) = counts.iter().find(|(_, value)| *value == 0) {
            return Err(ConfigError::Zero { field });
        }
        if !self.speedup_ratio.is_finite() || self.speedup_ratio < 0.0 {
            return Err(ConfigError::SpeedupRatio(self.speedup_ratio));
        }
        if !self.decode_speedup_ratio.is_finite() || self.decode_speedup_ratio <= 0.0 {
            return Err(ConfigError::DecodeSpeedupRatio(self.decode_speedup_ratio));
        }
        Ok(())
    }

    /// Tokens the whole cache can hold; a request needing more can never run.
    pub fn kv_capacity_tokens(&self) -> usize {
        self.num_gpu_blocks.saturating_mul(self.block_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_dynamo_and_are_valid() {
        let config = MockerConfig::default();
        assert_eq!((config.num_gpu_blocks, config.block_size), (16384, 64));
        assert_eq!((config.max_num_seqs, config.max_num_batched_tokens), (256, 8192));
        assert!(config.enable_prefix_caching);
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn zero_counts_are_rejected_with_the_field_name() {
        let config = MockerConfig {
            block_size: 0,
            ..MockerConfig::default()
        };
        let err = config.validate().unwrap_err();
        assert_eq!(err.to_string(), "block_size must be at least 1 (got 0)");

        let config = MockerConfig {
            max_num_batched_tokens: 0,
            ..MockerConfig::default()
        };
        assert_eq!(
            config.validate(),
            Err(ConfigError::Zero {
                field: "max_num_batched_tokens"
            })
        );
    }

    #[test]
    fn batch_budget_smaller_than_a_block_is_allowed() {
        let config = MockerConfig {
            max_num_batched_tokens: 1,
            block_size: 64,
            ..MockerConfig::default()
        };
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn speedup_ratio_must_be_finite_and_not_negative() {
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            let config = MockerConfig {
                speedup_ratio: bad,
                ..MockerConfig::default()
            };
            let message = config.validate().unwrap_err().to_string();
            assert!(
                message.starts_with("speedup_ratio must be a finite number >= 0"),
                "{message}"
            );
            assert!(message.ends_with(&format!("(got {bad})")), "{message}");
        }
        let config = MockerConfig {
            speedup_ratio: 0.0,
            ..MockerConfig::default()
        };
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn decode_speedup_ratio_must_be_positive() {
        let config = MockerConfig {
            decode_speedup_ratio: 0.0,
            ..MockerConfig::default()
        };
        assert_eq!(
            config.validate().unwrap_err().to_string(),
            "decode_speedup_ratio must be a finite number > 0 (got 0)"
        );
    }
}
