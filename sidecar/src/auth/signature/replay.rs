//! The bounded nonce replay cache.

use super::AuthError;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// A bounded set of recently seen `(keyid, nonce)` pairs, each remembered until the time after
/// which its signature would be rejected as expired anyway.
///
/// Entries are 128-bit keyed hashes (two independently keyed SipHash-1-3), so memory per nonce
/// stays small and fixed; a false "replayed" needs a 128-bit collision under keys the sender
/// does not know. Expiry is ordered by the time an entry may be forgotten (a min-heap), so an
/// entry remembered for long never delays the expiry of the others. Capacity is shared per key
/// id: each insert names the most entries its key id may hold (see [`Verifier`]), so one key
/// that fills its share is refused alone; `capacity` bounds the total.
pub struct ReplayCache {
    pub(super) capacity: usize,
    pub(super) hashers: (
        std::collections::hash_map::RandomState,
        std::collections::hash_map::RandomState,
    ),
    /// Entry hash -> (forget_at, key id hash).
    pub(super) seen: HashMap<u128, (i64, u64)>,
    /// (forget_at, entry hash), earliest first.
    pub(super) expiry: BinaryHeap<Reverse<(i64, u128)>>,
    /// Key id hash -> live entries of that key id.
    pub(super) per_key: HashMap<u64, usize>,
}

impl std::fmt::Debug for ReplayCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayCache")
            .field("capacity", &self.capacity)
            .field("len", &self.seen.len())
            .field("key_ids", &self.per_key.len())
            .finish()
    }
}

impl ReplayCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            hashers: Default::default(),
            seen: HashMap::new(),
            expiry: BinaryHeap::new(),
            per_key: HashMap::new(),
        }
    }

    /// The most entries held, all key ids together.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries held (some may be expired but not yet dropped; they are dropped on the next
    /// check or insert).
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn key(&self, keyid: &str, nonce: &str) -> u128 {
        use std::hash::BuildHasher;
        let a = self.hashers.0.hash_one((keyid, nonce));
        let b = self.hashers.1.hash_one((keyid, nonce));
        ((a as u128) << 64) | b as u128
    }

    fn owner(&self, keyid: &str) -> u64 {
        use std::hash::BuildHasher;
        self.hashers.0.hash_one(("key id", keyid))
    }

    /// Drop every entry whose `forget_at` is `<= now`.
    fn expire(&mut self, now: i64) {
        while let Some(&Reverse((t, k))) = self.expiry.peek() {
            if t > now {
                break;
            }
            self.expiry.pop();
            if let Some(&(forget_at, owner)) = self.seen.get(&k)
                && forget_at == t
            {
                self.seen.remove(&k);
                if let Some(n) = self.per_key.get_mut(&owner) {
                    *n -= 1;
                    if *n == 0 {
                        self.per_key.remove(&owner);
                    }
                }
            }
        }
    }

    /// Check without recording: `Replayed` when the nonce is live, `ReplayCacheFull` when
    /// `keyid` already holds `key_limit` live entries or the whole cache is full.
    pub fn check(
        &mut self,
        keyid: &str,
        nonce: &str,
        now: i64,
        key_limit: usize,
    ) -> Result<(), AuthError> {
        self.expire(now);
        if self.seen.contains_key(&self.key(keyid, nonce)) {
            return Err(AuthError::Replayed);
        }
        let held = self.per_key.get(&self.owner(keyid)).copied().unwrap_or(0);
        if held >= key_limit || self.seen.len() >= self.capacity {
            return Err(AuthError::ReplayCacheFull);
        }
        Ok(())
    }

    /// Record the nonce until `forget_at` (exclusive); fails as [`ReplayCache::check`] does
    /// (fail closed rather than forget a live nonce).
    pub fn check_and_insert(
        &mut self,
        keyid: &str,
        nonce: &str,
        forget_at: i64,
        now: i64,
        key_limit: usize,
    ) -> Result<(), AuthError> {
        self.check(keyid, nonce, now, key_limit)?;
        if forget_at <= now {
            // Already past its window: the signature is refused as expired from now on.
            return Ok(());
        }
        let k = self.key(keyid, nonce);
        let owner = self.owner(keyid);
        self.seen.insert(k, (forget_at, owner));
        self.expiry.push(Reverse((forget_at, k)));
        *self.per_key.entry(owner).or_insert(0) += 1;
        Ok(())
    }
}
