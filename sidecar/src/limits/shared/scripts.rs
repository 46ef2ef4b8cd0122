//! The server-side Lua scripts and the key layout. Every script reads the time from Redis
//! (`TIME`), so replicas with skewed clocks still agree; every script touches the keys of one
//! hash tag only (a tenant's `{tenant}`, or a key id's `{replay:...}`), so a Redis Cluster
//! runs each on one node.
//!
//! Units inside the scripts: microseconds for the rate algorithms, milliseconds for slot and
//! nonce expiry (sorted-set scores), tokens as floating point (a bucket refills continuously).

use redis::Script;
use std::sync::LazyLock;

/// A tenant's keys: `{prefix}{<tenant>}:rpm` (GCRA theoretical arrival time),
/// `{prefix}{<tenant>}:tpm` (token bucket: hash of balance `b` and time `t`),
/// `{prefix}{<tenant>}:conc` (concurrency slots: sorted set, score = expiry in ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantKeys {
    pub rpm: String,
    pub tpm: String,
    pub conc: Arc<str>,
}

use std::sync::Arc;

impl TenantKeys {
    pub fn new(prefix: &str, tenant: &str) -> Self {
        Self {
            rpm: format!("{prefix}{{{tenant}}}:rpm"),
            tpm: format!("{prefix}{{{tenant}}}:tpm"),
            conc: Arc::from(format!("{prefix}{{{tenant}}}:conc")),
        }
    }
}

/// The sorted set of a key id's live nonces: `{prefix}{replay:<key id hash>}:nonces`.
pub fn replay_key(prefix: &str, key_id: &str) -> String {
    format!(
        "{prefix}{{replay:{}}}:nonces",
        short_hash(&[key_id.as_bytes()])
    )
}

/// A nonce's member in its key id's set: 128 bits of SHA-256 over key id and nonce (the same
/// on every replica; fixed size whatever the nonce's length).
pub fn replay_member(key_id: &str, nonce: &str) -> String {
    short_hash(&[key_id.as_bytes(), b"\0", nonce.as_bytes()])
}

fn short_hash(parts: &[&[u8]]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    let d = ctx.finish();
    d.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Admission. KEYS: rpm, tpm, conc, and optionally the key id's nonce set. ARGV:
/// 1 rpm limit (0: none), 2 requests wanted, 3 requests needed,
/// 4 tpm limit (0: none), 5 tokens wanted, 6 tokens needed,
/// 7 max concurrent (0: none), 8 slot id, 9 slot lease (ms),
/// with the nonce set: 10 member, 11 forget at (unix ms), 12 the key id's share.
///
/// With a nonce (one server only: its set has another hash tag than the tenant's keys) the
/// nonce is checked and recorded first, as [`REPLAY`] does: status 4 replayed, 5 the key id's
/// share full, and no limit touched; otherwise it is recorded whatever the limits decide.
///
/// All or nothing: a refusal changes no key. Requests are GCRA (burst = the limit, one more
/// every 60/limit s); tokens a bucket of `limit` refilling `limit` per minute that admits when
/// its balance covers the need (or, for a need above the whole limit, when it is full), and
/// grants between `needed` and `wanted` (a lease takes what is there). Returns
/// `{status, retry_ms, requests granted, tokens granted, remaining requests, reset requests ms,
/// remaining tokens, reset tokens ms}`, status 0 admitted, 1 requests, 2 tokens, 3 concurrency.
pub static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now / 1000)
if #KEYS >= 4 then
  local forget = tonumber(ARGV[11])
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now_ms)
  if redis.call('ZSCORE', KEYS[4], ARGV[10]) then
    return {4, 0, 0, 0, -1, -1, -1, -1}
  end
  if redis.call('ZCARD', KEYS[4]) >= tonumber(ARGV[12]) then
    return {5, 0, 0, 0, -1, -1, -1, -1}
  end
  if forget > now_ms then
    redis.call('ZADD', KEYS[4], forget, ARGV[10])
    if redis.call('PTTL', KEYS[4]) < forget - now_ms then
      redis.call('PEXPIRE', KEYS[4], forget - now_ms)
    end
  end
end
local rpm = tonumber(ARGV[1])
local req_want = tonumber(ARGV[2])
local req_need = tonumber(ARGV[3])
local tpm = tonumber(ARGV[4])
local tok_want = tonumber(ARGV[5])
local tok_need = tonumber(ARGV[6])
local conc = tonumber(ARGV[7])

local rem_req, reset_req, rem_tok, reset_tok = -1, -1, -1, -1
-- Tokens: the bucket as of now (a missing key is a full bucket).
local bal, rate = 0, 0
if tpm > 0 then
  rate = tpm / 60000000
  local h = redis.call('HMGET', KEYS[2], 'b', 't')
  bal = tpm
  if h[1] then
    bal = math.min(tpm, tonumber(h[1]) + math.max(0, now - tonumber(h[2])) * rate)
  end
  rem_tok = math.max(0, math.floor(bal))
  reset_tok = math.floor((tpm - bal) / rate / 1000)
end
-- Requests: GCRA.
local tat, T, avail = now, 0, 0
if rpm > 0 then
  T = 60000000 / rpm
  local v = redis.call('GET', KEYS[1])
  if v then tat = math.max(now, tonumber(v)) end
  avail = math.floor((now + rpm * T - tat) / T + 1e-9)
  rem_req = math.max(0, avail)
  reset_req = math.floor((tat - now) / 1000)
end

if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now_ms)
  if redis.call('ZCARD', KEYS[3]) >= conc then
    return {3, 1000, 0, 0, rem_req, reset_req, rem_tok, reset_tok}
  end
end
local req_grant = 0
if rpm > 0 and req_need > 0 then
  if avail < req_need then
    local wait = tat + req_need * T - rpm * T - now
    return {1, math.ceil(wait / 1000), 0, 0, 0, math.ceil(wait / 1000), rem_tok, reset_tok}
  end
  req_grant = math.max(req_need, math.min(req_want, avail))
end
local tok_grant = 0
if tpm > 0 and tok_need > 0 then
  local need = math.min(tok_need, tpm)
  if bal < need then
    local wait = (need - bal) / rate
    return {2, math.ceil(wait / 1000), 0, 0, rem_req, reset_req, rem_tok, reset_tok}
  end
  tok_grant = math.max(tok_need, math.min(tok_want, math.floor(bal)))
end

-- Admitted: commit.
if req_grant > 0 then
  tat = tat + req_grant * T
  redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
  rem_req = math.max(0, avail - req_grant)
  reset_req = math.floor((tat - now) / 1000)
end
if tpm > 0 and tok_grant > 0 then
  bal = bal - tok_grant
  redis.call('HSET', KEYS[2], 'b', string.format('%.3f', bal), 't', string.format('%.0f', now))
  redis.call('PEXPIRE', KEYS[2], math.ceil((tpm - bal) / rate / 1000) + 1000)
  rem_tok = math.max(0, math.floor(bal))
  reset_tok = math.floor((tpm - bal) / rate / 1000)
end
if conc > 0 then
  local lease = tonumber(ARGV[9])
  redis.call('ZADD', KEYS[3], now_ms + lease, ARGV[8])
  redis.call('PEXPIRE', KEYS[3], 2 * lease)
end
return {0, 0, req_grant, tok_grant, rem_req, reset_req, rem_tok, reset_tok}
"#,
    )
});

/// Settlement and returns (of any number of requests at once). KEYS: rpm, tpm, conc. ARGV:
/// 1 rpm limit, 2 requests returned, 3 tpm limit, 4 tokens credited (negative: charged),
/// 5.. slot ids to release.
/// A credit never fills the bucket above its limit; returned requests move the GCRA time back
/// (never before now).
pub static SETTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local rpm = tonumber(ARGV[1])
local req = tonumber(ARGV[2])
local tpm = tonumber(ARGV[3])
local delta = tonumber(ARGV[4])
if rpm > 0 and req > 0 then
  local v = redis.call('GET', KEYS[1])
  if v then
    local tat = tonumber(v) - req * 60000000 / rpm
    if tat <= now then
      redis.call('DEL', KEYS[1])
    else
      redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
    end
  end
end
if tpm > 0 and delta ~= 0 then
  local rate = tpm / 60000000
  local h = redis.call('HMGET', KEYS[2], 'b', 't')
  local bal = tpm
  if h[1] then
    bal = math.min(tpm, tonumber(h[1]) + math.max(0, now - tonumber(h[2])) * rate)
  end
  bal = math.min(tpm, bal + delta)
  if bal >= tpm then
    redis.call('DEL', KEYS[2])
  else
    redis.call('HSET', KEYS[2], 'b', string.format('%.3f', bal), 't', string.format('%.0f', now))
    redis.call('PEXPIRE', KEYS[2], math.ceil((tpm - bal) / rate / 1000) + 1000)
  end
end
if #ARGV >= 5 then
  redis.call('ZREM', KEYS[3], unpack(ARGV, 5))
end
return 0
"#,
    )
});

/// Renew a replica's live slots. KEYS: conc. ARGV: 1 lease (ms), 2.. slot ids. A slot that is
/// missing is added again (its request still runs: Redis restarted empty, or the slot expired
/// while Redis was out of reach). Returns how many were added back.
pub static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local n = 0
for i = 2, #ARGV do
  n = n + redis.call('ZADD', KEYS[1], now_ms + lease, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], 2 * lease)
return n
"#,
    )
});

/// Record a nonce. KEYS: the key id's nonce set. ARGV: 1 member, 2 forget at (unix ms),
/// 3 live nonces the key id may hold. Returns 0 recorded, 1 replayed, 2 the key id's share is
/// full (nothing recorded). Entries past their time are dropped first, so the count is exact.
pub static REPLAY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local forget = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 1
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 2
end
if forget <= now_ms then
  return 0
end
redis.call('ZADD', KEYS[1], forget, ARGV[1])
if redis.call('PTTL', KEYS[1]) < forget - now_ms then
  redis.call('PEXPIRE', KEYS[1], forget - now_ms)
end
return 0
"#,
    )
});

/// A stored response's key: `{prefix}{<tenant>}:resp:<id hash>` (in the tenant's hash tag).
pub fn response_key(prefix: &str, tenant: &str, id: &str) -> String {
    format!("{prefix}{{{tenant}}}:resp:{}", short_hash(&[id.as_bytes()]))
}

/// Remember a stored response. KEYS: its key. ARGV: 1 time to live (ms).
pub static RESPONSE_RECORD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
redis.call('SET', KEYS[1], '1', 'PX', tonumber(ARGV[1]))
return 1
"#,
    )
});

/// Whether a stored response is the tenant's. KEYS: its key. Returns 1 or 0.
pub static RESPONSE_OWNED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
return redis.call('EXISTS', KEYS[1])
"#,
    )
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenants_keys_share_one_hash_tag() {
        let k = TenantKeys::new("bh:", "acme-1");
        assert_eq!(k.rpm, "bh:{acme-1}:rpm");
        assert_eq!(k.tpm, "bh:{acme-1}:tpm");
        assert_eq!(&*k.conc, "bh:{acme-1}:conc");
        let r = replay_key("bh:", "gw");
        assert!(
            r.starts_with("bh:{replay:") && r.ends_with("}:nonces"),
            "{r}"
        );
        assert_eq!(replay_member("gw", "n1").len(), 32);
        assert_ne!(replay_member("gw", "n1"), replay_member("g", "wn1"));
    }
}
