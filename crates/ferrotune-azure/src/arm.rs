//! The ARM client: workspace-relative URLs at a pinned api-version, bearer tokens, Azure's error
//! bodies turned into messages with the request id, and long-running operations polled through
//! `Azure-AsyncOperation` or `Location`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;

use crate::credential::{TokenCredential, ARM_SCOPE};
use crate::error::{AzureError, Result};
use crate::http::{mask_url, retry_after, Call, Reply, Transport};
use crate::workspace::Workspace;

pub const API_VERSION: &str = "2024-10-01";
pub const DEFAULT_ARM_ENDPOINT: &str = "https://management.azure.com";

/// Reports what a long-running operation is doing while it is polled.
pub type Progress<'a> = &'a mut dyn FnMut(&str);

pub struct Arm {
    transport: Transport,
    credential: Arc<dyn TokenCredential>,
    base: String,
    pub workspace: Workspace,
    pub poll_interval: Duration,
    pub operation_timeout: Duration,
}

impl Arm {
    pub fn new(
        transport: Transport,
        credential: Arc<dyn TokenCredential>,
        base: &str,
        workspace: Workspace,
    ) -> Self {
        Arm {
            transport,
            credential,
            base: base.trim_end_matches('/').to_string(),
            workspace,
            poll_interval: Duration::from_secs(10),
            operation_timeout: Duration::from_secs(2 * 3600),
        }
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    pub fn credential(&self) -> &Arc<dyn TokenCredential> {
        &self.credential
    }

    pub fn is_dry_run(&self) -> bool {
        self.transport.is_dry_run()
    }

    /// `{base}{workspace arm path}/{rel}?api-version=...` (`rel` may be empty: the workspace).
    pub fn ws_url(&self, rel: &str) -> String {
        let path = if rel.is_empty() {
            self.workspace.arm_path()
        } else {
            format!(
                "{}/{}",
                self.workspace.arm_path(),
                rel.trim_start_matches('/')
            )
        };
        self.url(&path)
    }

    /// An absolute ARM path (starting with `/subscriptions/...`) at the pinned api-version.
    pub fn url(&self, arm_path: &str) -> String {
        let sep = if arm_path.contains('?') { '&' } else { '?' };
        format!("{}{arm_path}{sep}api-version={API_VERSION}", self.base)
    }

    /// The ARM id of something in the workspace (what deployments name as their model).
    pub fn ws_id(&self, rel: &str) -> String {
        format!(
            "{}/{}",
            self.workspace.arm_path(),
            rel.trim_start_matches('/')
        )
    }

    fn authorized(&self, call: Call, scope: &str) -> Result<Call> {
        let token = if self.is_dry_run() {
            "***".to_string()
        } else {
            self.credential.token(scope)?.secret
        };
        Ok(call.header("Authorization", format!("Bearer {token}")))
    }

    pub fn send(&self, call: Call) -> Result<Reply> {
        self.send_for(call, ARM_SCOPE)
    }

    /// A call to another Azure ML service (run history) with a token for its `scope`.
    pub fn send_for(&self, call: Call, scope: &str) -> Result<Reply> {
        let call = self.authorized(call, scope)?;
        let reply = self.transport.send(&call)?;
        if reply.ok() {
            Ok(reply)
        } else {
            Err(api_error(&call, &reply))
        }
    }

    pub fn get(&self, url: &str) -> Result<Value> {
        self.send(Call::new(Method::GET, url))?.json()
    }

    /// GET that answers `None` for 404.
    pub fn get_opt(&self, url: &str) -> Result<Option<Value>> {
        match self.get(url) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn put(&self, url: &str, body: Value) -> Result<Value> {
        self.send(Call::new(Method::PUT, url).json(body))?.json()
    }

    pub fn post(&self, url: &str, body: Option<Value>) -> Result<Value> {
        let mut call = Call::new(Method::POST, url);
        if let Some(b) = body {
            call = call.json(b);
        }
        self.send(call)?.json()
    }

    /// PUT that may start a long-running operation: waits for it, then answers the resource.
    pub fn put_and_wait(
        &self,
        url: &str,
        body: Value,
        what: &str,
        progress: Progress,
    ) -> Result<Value> {
        let reply = self.send(Call::new(Method::PUT, url).json(body))?;
        if reply.dry_run {
            return Ok(Value::Null);
        }
        self.wait(&reply, what, progress)?;
        self.get(url)
    }

    /// DELETE and wait until the resource is gone. A resource that is already gone is fine.
    pub fn delete_and_wait(&self, url: &str, what: &str, progress: Progress) -> Result<()> {
        let reply = match self.send(Call::new(Method::DELETE, url)) {
            Err(e) if e.status() == Some(404) => {
                progress(&format!("{what}: already absent"));
                return Ok(());
            }
            other => other?,
        };
        if reply.dry_run {
            return Ok(());
        }
        self.wait(&reply, what, progress)
    }

    /// Follows `Azure-AsyncOperation` (a status document) or `Location` (202 until done).
    fn wait(&self, first: &Reply, what: &str, progress: Progress) -> Result<()> {
        let started = Instant::now();
        let async_op = first.header("azure-asyncoperation").map(str::to_string);
        let location = first.header("location").map(str::to_string);
        let mut delay = retry_after(&first.headers).unwrap_or(self.poll_interval);
        let (url, by_status_document) = match (async_op, location) {
            (Some(u), _) => (u, true),
            (None, Some(u)) if first.status == 202 => (u, false),
            _ => {
                progress(&format!("{what}: done"));
                return Ok(());
            }
        };
        let mut last = String::new();
        loop {
            if started.elapsed() > self.operation_timeout {
                return Err(AzureError::Operation(format!(
                    "{what}: still {last} after {} s; it goes on in Azure, follow it in the studio or raise --timeout",
                    started.elapsed().as_secs()
                )));
            }
            std::thread::sleep(delay);
            let reply = self.send(Call::new(Method::GET, &url))?;
            delay = retry_after(&reply.headers).unwrap_or(self.poll_interval);
            if by_status_document {
                let doc = reply.json()?;
                let status = doc
                    .get("status")
                    .and_then(Value::as_str)
                    .unwrap_or("Unknown")
                    .to_string();
                if status != last {
                    progress(&format!(
                        "{what}: {status} ({} s)",
                        started.elapsed().as_secs()
                    ));
                    last = status.clone();
                }
                match status.as_str() {
                    "Succeeded" => return Ok(()),
                    "Failed" | "Canceled" | "Cancelled" => {
                        let err = doc.get("error").cloned().unwrap_or(Value::Null);
                        return Err(AzureError::Operation(format!(
                            "{what}: {status}: {}: {}",
                            err.get("code").and_then(Value::as_str).unwrap_or("no code"),
                            err.get("message")
                                .and_then(Value::as_str)
                                .unwrap_or("no message")
                        )));
                    }
                    _ => {}
                }
            } else if reply.status == 202 {
                if last != "InProgress" {
                    progress(&format!(
                        "{what}: in progress ({} s)",
                        started.elapsed().as_secs()
                    ));
                    last = "InProgress".into();
                }
            } else {
                progress(&format!("{what}: done ({} s)", started.elapsed().as_secs()));
                return Ok(());
            }
        }
    }
}

/// Azure's `{"error": {"code", "message"}}` with the request id, or the raw body.
pub fn api_error(call: &Call, reply: &Reply) -> AzureError {
    let body: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
    let err = body.get("error").unwrap_or(&body);
    let code = err
        .get("code")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| format!("HTTP{}", reply.status));
    let message = err
        .get("message")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| {
            String::from_utf8_lossy(&reply.body[..reply.body.len().min(400)])
                .trim()
                .to_string()
        });
    let request_id = [
        "x-ms-request-id",
        "x-ms-correlation-request-id",
        "x-request-id",
    ]
    .iter()
    .find_map(|h| reply.header(h).map(str::to_string));
    AzureError::Api {
        method: call.method.to_string(),
        url: mask_url(&call.url),
        status: reply.status,
        code,
        message,
        request_id,
    }
}
