//! The agent's tagging API: one JSON request per `SOCK_SEQPACKET` message on a Unix socket,
//! with the socket to act on attached as `SCM_RIGHTS`; one JSON response per request.
//!
//! The agent reads the socket cookie from the descriptor it received, so a caller can only
//! tag sockets it actually holds.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::string::String;

/// Largest request or response, in bytes. Longer requests are rejected as malformed.
pub const MAX_MESSAGE_LEN: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Tag the attached socket with `tenant`; replaces an earlier tag (re-tag).
    Tag { tenant: String },
    /// Remove the attached socket's tag; its later traffic counts as untagged.
    Untag,
    /// Report the attached socket's tag without changing it.
    Lookup,
    /// A shared inference server's sidecar reports the KV-cache bytes each tenant's in-flight
    /// requests hold. No socket attached: the agent finds the server's pod from the kernel's
    /// record of the connecting process (`SO_PEERPIDFD`, from any PID namespace), so a report
    /// can only speak for the caller's own pod.
    ///
    /// `tokens` (optional, so a sidecar that predates it is still heard): per tenant, the
    /// tokens the sidecar had the server process since its previous report, prompt and
    /// generated weighted by its fair queue's input and output costs; the agent splits the
    /// server's GPU time and energy by them.
    KvReport {
        tenants: BTreeMap<String, u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tokens: Option<BTreeMap<String, u64>>,
    },
}

impl Request {
    pub fn op(&self) -> &'static str {
        match self {
            Request::Tag { .. } => "tag",
            Request::Untag => "untag",
            Request::Lookup => "lookup",
            Request::KvReport { .. } => "kv_report",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is not valid JSON of the expected shape, or is too long.
    Malformed,
    /// No descriptor was attached, or more than one.
    MissingSocket,
    /// The attached descriptor is not a socket.
    NotASocket,
    /// A socket, but not one whose traffic the kernel programs see (not AF_INET/AF_INET6).
    UnsupportedSocket,
    /// The tenant is not in the agent's configuration.
    UnknownTenant,
    /// The caller's credentials (SO_PEERCRED) are not allowed by the agent's configuration, or
    /// a KV report names a tenant its shared server is not configured for.
    NotAllowed,
    /// A KV report from a process that is not in a workload configured as a shared server
    /// (a report never makes a pod one).
    UnknownWorkload,
    /// The agent failed (e.g. a full map); the message says why.
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::MissingSocket => "missing_socket",
            ErrorCode::NotASocket => "not_a_socket",
            ErrorCode::UnsupportedSocket => "unsupported_socket",
            ErrorCode::UnknownTenant => "unknown_tenant",
            ErrorCode::NotAllowed => "not_allowed",
            ErrorCode::UnknownWorkload => "unknown_workload",
            ErrorCode::Internal => "internal",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Response {
    Ok {
        /// The socket's tenant after the request; `None` when it is untagged.
        tenant: Option<String>,
        tenant_id: u32,
        cookie: u64,
    },
    /// A KV report was recorded, for this many tenants.
    Accepted {
        accepted: u32,
    },
    Err {
        error: ErrorBody,
    },
}

impl Response {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Response::Err {
            error: ErrorBody {
                code,
                message: message.into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_stable() {
        let req = Request::Tag {
            tenant: "acme".into(),
        };
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"op":"tag","tenant":"acme"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"untag"}"#).unwrap(),
            Request::Untag
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"tag"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"tag","tenant":"a","x":1}"#).is_err());
        let err = Response::error(ErrorCode::UnknownTenant, "no tenant \"zed\"");
        let text = serde_json::to_string(&err).unwrap();
        assert_eq!(
            text,
            r#"{"error":{"code":"unknown_tenant","message":"no tenant \"zed\""}}"#
        );
        assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), err);
        let ok: Response =
            serde_json::from_str(r#"{"tenant":"acme","tenant_id":3,"cookie":77}"#).unwrap();
        assert_eq!(
            ok,
            Response::Ok {
                tenant: Some("acme".into()),
                tenant_id: 3,
                cookie: 77
            }
        );
        let kv = Request::KvReport {
            tenants: BTreeMap::from([("acme".into(), 4096)]),
            tokens: None,
        };
        let old_sidecar = r#"{"op":"kv_report","tenants":{"acme":4096}}"#;
        assert_eq!(serde_json::to_string(&kv).unwrap(), old_sidecar);
        // A report from a sidecar without token counts is still a report.
        assert_eq!(serde_json::from_str::<Request>(old_sidecar).unwrap(), kv);
        let with_tokens = Request::KvReport {
            tenants: BTreeMap::from([("acme".into(), 4096)]),
            tokens: Some(BTreeMap::from([("acme".into(), 300)])),
        };
        let text = r#"{"op":"kv_report","tenants":{"acme":4096},"tokens":{"acme":300}}"#;
        assert_eq!(serde_json::to_string(&with_tokens).unwrap(), text);
        assert_eq!(serde_json::from_str::<Request>(text).unwrap(), with_tokens);
        assert_eq!(
            serde_json::from_str::<Response>(r#"{"accepted":2}"#).unwrap(),
            Response::Accepted { accepted: 2 }
        );
    }
}
