//! The sidecar's side of the node agent: tagging upstream sockets with the tenant
//! ([`tagging`]) and reporting in-flight KV and tokens per tenant ([`kv`]).
pub mod kv;
pub mod tagging;
