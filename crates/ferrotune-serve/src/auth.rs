//! API keys: `Authorization: Bearer KEY` or `api-key: KEY` (Azure's two forms), compared in
//! constant time against the primary and secondary keys; the admin key guards `/admin`.

use axum::http::HeaderMap;
use subtle::ConstantTimeEq;

#[derive(Debug, Clone, Default)]
pub struct Keys {
    /// Primary and secondary; empty means no authentication (loopback or --insecure-no-auth).
    pub keys: Vec<String>,
    /// For `PUT /admin/traffic`; without one, the primary key is the admin key.
    pub admin: Option<String>,
}

fn presented(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        return v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "));
    }
    headers.get("api-key").and_then(|v| v.to_str().ok())
}

fn equal(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

impl Keys {
    pub fn open(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether the request carries one of the keys (always, when none is configured).
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        if self.open() {
            return true;
        }
        let Some(given) = presented(headers) else {
            return false;
        };
        // Check every key so the time does not say which one matched.
        self.keys.iter().fold(false, |ok, k| ok | equal(given, k))
    }

    pub fn allows_admin(&self, headers: &HeaderMap) -> bool {
        let admin = self
            .admin
            .as_deref()
            .or(self.keys.first().map(String::as_str));
        match (admin, presented(headers)) {
            (None, _) => true,
            (Some(a), Some(g)) => equal(g, a),
            (Some(_), None) => false,
        }
    }
}
