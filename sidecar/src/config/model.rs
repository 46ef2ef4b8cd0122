//! `[model]`: the served model's KV-cache geometry (optional; enables KV bytes and reports).

use super::{ConfigError, invalid};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    Bf16,
    Fp16,
    Fp8,
    Fp32,
}

impl Dtype {
    pub fn bytes(self) -> u64 {
        match self {
            Dtype::Fp8 => 1,
            Dtype::Bf16 | Dtype::Fp16 => 2,
            Dtype::Fp32 => 4,
        }
    }
}

/// The geometry has no default (every field but `media_part_tokens` is required), so this
/// section has no `Default`: serde takes that one field's default from [`media_part_tokens`].
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub layers: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub dtype: Dtype,
    /// Prompt tokens charged for each image, audio or video part of a prompt (its worst case:
    /// never the length of its URL or data).
    #[serde(default = "media_part_tokens")]
    pub media_part_tokens: u64,
}

/// `model.media_part_tokens`' default.
pub fn media_part_tokens() -> u64 {
    crate::proxy::schema::DEFAULT_MEDIA_TOKENS
}

impl ModelConfig {
    /// KV-cache bytes per token: 2 (K and V) x layers x kv_heads x head_dim x dtype bytes.
    pub fn kv_bytes_per_token(&self) -> u64 {
        2 * self.layers as u64 * self.kv_heads as u64 * self.head_dim as u64 * self.dtype.bytes()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for (k, v) in [
            ("layers", self.layers),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 || v > 1_000_000 {
                return Err(invalid(format!("model.{k}"), "must be within 1..=1000000"));
            }
        }
        Ok(())
    }
}
