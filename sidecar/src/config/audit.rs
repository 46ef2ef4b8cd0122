//! `[audit]`: the per-tenant audit log's place, prompt-hash key and size bounds.

use super::{ConfigError, invalid};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The smallest `audit.max_file_bytes`; each stream's share is at least twice this.
pub const AUDIT_MIN_FILE_BYTES: u64 = 64 * 1024;
/// `audit.max_total_bytes` is at most this many times `audit.max_file_bytes`.
pub const AUDIT_MAX_FILES: u64 = 1024;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Directory for per-tenant `<tenant>.jsonl` files; no audit log when absent.
    pub dir: Option<PathBuf>,
    /// Key for the keyed prompt hash (base64 file); a random per-process key when absent.
    pub hash_key_file: Option<PathBuf>,
    /// A stream's `<stream>.jsonl` rotates to `.1`, `.2`, ... at this size (or at half the
    /// stream's share of `max_total_bytes`, when that is smaller).
    pub max_file_bytes: u64,
    /// All audit files together never exceed this; each stream (every tenant, and
    /// `_unauthenticated`) gets an equal share and only its own old files are deleted.
    pub max_total_bytes: u64,
    /// Records of refused, unauthenticated requests written per second at most ...
    pub unauthenticated_per_second: u32,
    /// ... with bursts up to this many (the rest are counted as dropped).
    pub unauthenticated_burst: u32,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            dir: None,
            hash_key_file: None,
            max_file_bytes: 64 * 1024 * 1024,
            max_total_bytes: 512 * 1024 * 1024,
            unauthenticated_per_second: 100,
            unauthenticated_burst: 100,
        }
    }
}

impl AuditConfig {
    /// `tenants`: how many tenants write streams of their own.
    pub fn validate(&self, tenants: usize) -> Result<(), ConfigError> {
        if self.max_file_bytes < AUDIT_MIN_FILE_BYTES {
            return Err(invalid(
                "audit.max_file_bytes",
                format!("must be >= {AUDIT_MIN_FILE_BYTES} (64 KiB)"),
            ));
        }
        if self.max_file_bytes > self.max_total_bytes {
            return Err(invalid(
                "audit.max_file_bytes",
                format!(
                    "must be <= audit.max_total_bytes ({} > {})",
                    self.max_file_bytes, self.max_total_bytes
                ),
            ));
        }
        if self.max_total_bytes / self.max_file_bytes > AUDIT_MAX_FILES {
            return Err(invalid(
                "audit.max_total_bytes",
                format!(
                    "must be <= {AUDIT_MAX_FILES} x audit.max_file_bytes (raise max_file_bytes)"
                ),
            ));
        }
        // Every stream (each tenant and `_unauthenticated`) keeps a current and a rotated file.
        let streams = tenants as u64 + 1;
        let least = streams.saturating_mul(2 * AUDIT_MIN_FILE_BYTES);
        if self.max_total_bytes < least {
            return Err(invalid(
                "audit.max_total_bytes",
                format!(
                    "must be >= {least}: {streams} streams ({tenants} tenants and \
                     _unauthenticated) x 128 KiB each"
                ),
            ));
        }
        if self.unauthenticated_per_second == 0 || self.unauthenticated_per_second > 100_000 {
            return Err(invalid(
                "audit.unauthenticated_per_second",
                "must be within 1..=100000",
            ));
        }
        if self.unauthenticated_burst == 0 || self.unauthenticated_burst > 100_000 {
            return Err(invalid(
                "audit.unauthenticated_burst",
                "must be within 1..=100000",
            ));
        }
        Ok(())
    }
}
