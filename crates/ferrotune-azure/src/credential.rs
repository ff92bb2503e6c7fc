//! Tokens in `DefaultAzureCredential`'s order: environment client secret, workload identity,
//! managed identity (App Service's `IDENTITY_ENDPOINT`, Azure ML compute's `MSI_ENDPOINT`, else
//! IMDS), then the Azure CLI. Tokens are cached per scope until five minutes before they expire.
//! The environment is passed in, not read here, so tests never touch the process's variables.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use reqwest::blocking::Client;
use serde_json::Value;

use crate::error::{AzureError, Result};

pub const ARM_SCOPE: &str = "https://management.azure.com/.default";
pub const STORAGE_SCOPE: &str = "https://storage.azure.com/.default";
/// Azure ML's data-plane services (run history, discovery).
pub const ML_SCOPE: &str = "https://ml.azure.com/.default";

#[derive(Clone)]
pub struct AccessToken {
    pub secret: String,
    pub expires_at: SystemTime,
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("secret", &"***")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

pub trait TokenCredential: Send + Sync {
    fn token(&self, scope: &str) -> Result<AccessToken>;
    /// Which source answered, for `azure login`.
    fn source(&self) -> String;
}

/// One way of getting a token, configured from the environment.
#[derive(Debug, Clone)]
enum Source {
    ClientSecret {
        authority: String,
        tenant: String,
        client_id: String,
        secret: String,
    },
    WorkloadIdentity {
        authority: String,
        tenant: String,
        client_id: String,
        token_file: String,
    },
    AppServiceIdentity {
        endpoint: String,
        header: String,
        client_id: Option<String>,
    },
    AzureMlComputeIdentity {
        endpoint: String,
        secret: Option<String>,
        client_id: Option<String>,
    },
    Imds {
        host: String,
        client_id: Option<String>,
    },
    AzureCli {
        program: String,
    },
}

impl Source {
    fn name(&self) -> &'static str {
        match self {
            Source::ClientSecret { .. } => "environment (AZURE_CLIENT_SECRET)",
            Source::WorkloadIdentity { .. } => "workload identity (AZURE_FEDERATED_TOKEN_FILE)",
            Source::AppServiceIdentity { .. } => "managed identity (IDENTITY_ENDPOINT)",
            Source::AzureMlComputeIdentity { .. } => {
                "managed identity of Azure ML compute (MSI_ENDPOINT)"
            }
            Source::Imds { .. } => "managed identity (IMDS)",
            Source::AzureCli { .. } => "Azure CLI (az account get-access-token)",
        }
    }
}

/// Why a source gave no token: `Unavailable` moves on to the next one, `Failed` stops the chain
/// (a configured secret that is wrong must not be papered over by a different identity).
enum Attempt {
    Unavailable(String),
    Failed(String),
}

pub struct DefaultCredential {
    http: Client,
    sources: Vec<Source>,
    cache: Mutex<HashMap<String, AccessToken>>,
    chosen: Mutex<Option<usize>>,
}

impl DefaultCredential {
    /// The chain for this environment (pass `std::env::vars().collect()` in real use).
    pub fn from_env(env: &HashMap<String, String>) -> Result<Self> {
        let get = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
        let authority = get("AZURE_AUTHORITY_HOST")
            .unwrap_or_else(|| "https://login.microsoftonline.com".into())
            .trim_end_matches('/')
            .to_string();
        let mut sources = Vec::new();
        if let (Some(tenant), Some(client_id), Some(secret)) = (
            get("AZURE_TENANT_ID"),
            get("AZURE_CLIENT_ID"),
            get("AZURE_CLIENT_SECRET"),
        ) {
            sources.push(Source::ClientSecret {
                authority: authority.clone(),
                tenant,
                client_id,
                secret,
            });
        }
        if let (Some(tenant), Some(client_id), Some(token_file)) = (
            get("AZURE_TENANT_ID"),
            get("AZURE_CLIENT_ID"),
            get("AZURE_FEDERATED_TOKEN_FILE"),
        ) {
            sources.push(Source::WorkloadIdentity {
                authority,
                tenant,
                client_id,
                token_file,
            });
        }
        let mi_client = get("AZURE_CLIENT_ID");
        if let (Some(endpoint), Some(header)) = (get("IDENTITY_ENDPOINT"), get("IDENTITY_HEADER")) {
            sources.push(Source::AppServiceIdentity {
                endpoint,
                header,
                client_id: mi_client,
            });
        } else if let Some(endpoint) = get("MSI_ENDPOINT") {
            sources.push(Source::AzureMlComputeIdentity {
                endpoint,
                secret: get("MSI_SECRET"),
                client_id: get("DEFAULT_IDENTITY_CLIENT_ID").or(mi_client),
            });
        } else if get("FERROTUNE_AZURE_NO_IMDS").is_none() {
            let host = get("AZURE_POD_IDENTITY_AUTHORITY_HOST")
                .unwrap_or_else(|| "http://169.254.169.254".into());
            sources.push(Source::Imds {
                host: host.trim_end_matches('/').to_string(),
                client_id: mi_client,
            });
        }
        sources.push(Source::AzureCli {
            program: get("FERROTUNE_AZ_CLI").unwrap_or_else(|| "az".into()),
        });
        let http = Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| AzureError::Credential(format!("cannot build the HTTP client: {e}")))?;
        Ok(DefaultCredential {
            http,
            sources,
            cache: Mutex::new(HashMap::new()),
            chosen: Mutex::new(None),
        })
    }

    /// The names of the sources that will be tried, in order.
    pub fn chain(&self) -> Vec<&'static str> {
        self.sources.iter().map(Source::name).collect()
    }

    fn fetch(&self, source: &Source, scope: &str) -> std::result::Result<AccessToken, Attempt> {
        let resource = scope.trim_end_matches("/.default");
        match source {
            Source::ClientSecret {
                authority,
                tenant,
                client_id,
                secret,
            } => {
                let form = [
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id.as_str()),
                    ("client_secret", secret.as_str()),
                    ("scope", scope),
                ];
                self.aad(authority, tenant, &form)
            }
            Source::WorkloadIdentity {
                authority,
                tenant,
                client_id,
                token_file,
            } => {
                let assertion = std::fs::read_to_string(token_file).map_err(|e| {
                    Attempt::Failed(format!("AZURE_FEDERATED_TOKEN_FILE {token_file}: {e}"))
                })?;
                let form = [
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id.as_str()),
                    (
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    ),
                    ("client_assertion", assertion.trim()),
                    ("scope", scope),
                ];
                self.aad(authority, tenant, &form)
            }
            Source::AppServiceIdentity {
                endpoint,
                header,
                client_id,
            } => {
                let mut query = vec![("api-version", "2019-08-01"), ("resource", resource)];
                if let Some(id) = client_id {
                    query.push(("client_id", id));
                }
                let req = self
                    .http
                    .get(endpoint)
                    .query(&query)
                    .header("X-IDENTITY-HEADER", header);
                identity_token(req, "IDENTITY_ENDPOINT", false)
            }
            Source::AzureMlComputeIdentity {
                endpoint,
                secret,
                client_id,
            } => {
                let mut query = vec![("api-version", "2017-09-01"), ("resource", resource)];
                if let Some(id) = client_id {
                    query.push(("clientid", id));
                }
                let mut req = self.http.get(endpoint).query(&query);
                if let Some(s) = secret {
                    req = req.header("secret", s);
                }
                identity_token(req, "MSI_ENDPOINT", false)
            }
            Source::Imds { host, client_id } => {
                let mut query = vec![("api-version", "2019-08-01"), ("resource", resource)];
                if let Some(id) = client_id {
                    query.push(("client_id", id));
                }
                let req = self
                    .http
                    .get(format!("{host}/metadata/identity/oauth2/token"))
                    .query(&query)
                    .header("Metadata", "true")
                    .timeout(Duration::from_secs(3));
                identity_token(req, "IMDS", true)
            }
            Source::AzureCli { program } => cli_token(program, resource),
        }
    }

    fn aad(
        &self,
        authority: &str,
        tenant: &str,
        form: &[(&str, &str)],
    ) -> std::result::Result<AccessToken, Attempt> {
        let url = format!("{authority}/{tenant}/oauth2/v2.0/token");
        let response = self
            .http
            .post(&url)
            .form(form)
            .send()
            .map_err(|e| Attempt::Failed(format!("POST {url}: {e}")))?;
        let status = response.status();
        let body: Value = response.json().unwrap_or(Value::Null);
        if !status.is_success() {
            let why = body
                .get("error_description")
                .or_else(|| body.get("error"))
                .and_then(Value::as_str)
                .unwrap_or("no error description");
            return Err(Attempt::Failed(format!(
                "POST {url} answered HTTP {}: {why}",
                status.as_u16()
            )));
        }
        parse_token(&body)
            .ok_or_else(|| Attempt::Failed(format!("POST {url}: no access_token in the answer")))
    }
}

fn identity_token(
    req: reqwest::blocking::RequestBuilder,
    what: &str,
    probe: bool,
) -> std::result::Result<AccessToken, Attempt> {
    let response = match req.send() {
        Ok(r) => r,
        // IMDS is only a guess: nothing listening means "not on an Azure VM".
        Err(e) if probe => return Err(Attempt::Unavailable(format!("{what} not reachable ({e})"))),
        Err(e) => return Err(Attempt::Failed(format!("{what}: {e}"))),
    };
    let status = response.status();
    let body: Value = response.json().unwrap_or(Value::Null);
    if !status.is_success() {
        let why = body
            .get("error_description")
            .or_else(|| body.get("message"))
            .and_then(Value::as_str)
            .unwrap_or("no description");
        // IMDS answers 400 when the VM has no identity assigned: a reason to try the CLI.
        if probe && status.as_u16() == 400 {
            return Err(Attempt::Unavailable(format!(
                "{what}: no identity assigned ({why})"
            )));
        }
        return Err(Attempt::Failed(format!(
            "{what} answered HTTP {}: {why}",
            status.as_u16()
        )));
    }
    parse_token(&body)
        .ok_or_else(|| Attempt::Failed(format!("{what}: no access_token in the answer")))
}

fn cli_token(program: &str, resource: &str) -> std::result::Result<AccessToken, Attempt> {
    let output = std::process::Command::new(program)
        .args([
            "account",
            "get-access-token",
            "--output",
            "json",
            "--resource",
            resource,
        ])
        .output()
        .map_err(|e| {
            Attempt::Unavailable(format!(
                "`{program}` not found ({e}); install the Azure CLI or set AZURE_CLIENT_SECRET"
            ))
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stderr.contains("az login") {
            return Err(Attempt::Unavailable(
                "the Azure CLI is not logged in: run `az login`".into(),
            ));
        }
        return Err(Attempt::Failed(format!(
            "`{program} account get-access-token` failed: {}",
            stderr.trim()
        )));
    }
    let body: Value = serde_json::from_slice(&output.stdout).map_err(|e| {
        Attempt::Failed(format!(
            "`{program} account get-access-token` printed no JSON: {e}"
        ))
    })?;
    parse_token(&body).ok_or_else(|| Attempt::Failed(format!("`{program}` printed no accessToken")))
}

/// AAD (`expires_in`), managed identity (`expires_on` as a string or number) and the CLI
/// (`accessToken`, `expires_on`) all answer slightly differently.
fn parse_token(body: &Value) -> Option<AccessToken> {
    let secret = body
        .get("access_token")
        .or_else(|| body.get("accessToken"))?
        .as_str()?
        .to_string();
    let number = |v: &Value| {
        v.as_u64()
            .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
    };
    let now = SystemTime::now();
    let expires_at = if let Some(on) = body.get("expires_on").and_then(number) {
        UNIX_EPOCH + Duration::from_secs(on)
    } else if let Some(secs) = body.get("expires_in").and_then(number) {
        now + Duration::from_secs(secs)
    } else {
        now + Duration::from_secs(300)
    };
    Some(AccessToken { secret, expires_at })
}

impl TokenCredential for DefaultCredential {
    fn token(&self, scope: &str) -> Result<AccessToken> {
        let margin = Duration::from_secs(300);
        if let Some(t) = self.cache.lock().expect("token cache").get(scope) {
            if t.expires_at > SystemTime::now() + margin {
                return Ok(t.clone());
            }
        }
        let start = self.chosen.lock().expect("chosen").unwrap_or(0);
        let mut unavailable = Vec::new();
        for (i, source) in self.sources.iter().enumerate().skip(start) {
            match self.fetch(source, scope) {
                Ok(token) => {
                    *self.chosen.lock().expect("chosen") = Some(i);
                    self.cache
                        .lock()
                        .expect("token cache")
                        .insert(scope.to_string(), token.clone());
                    return Ok(token);
                }
                Err(Attempt::Unavailable(why)) => {
                    unavailable.push(format!("{}: {why}", source.name()))
                }
                Err(Attempt::Failed(why)) => {
                    return Err(AzureError::Credential(format!(
                        "{} failed: {why}",
                        source.name()
                    )))
                }
            }
        }
        Err(AzureError::Credential(format!(
            "no credential available for {scope}; tried {}. Set AZURE_TENANT_ID/AZURE_CLIENT_ID/AZURE_CLIENT_SECRET \
             or run `az login`",
            unavailable.join("; ")
        )))
    }

    fn source(&self) -> String {
        match *self.chosen.lock().expect("chosen") {
            Some(i) => self.sources[i].name().to_string(),
            None => "none yet".to_string(),
        }
    }
}

/// Who a token says its holder is, read from the JWT's claims (the signature is Azure's to check).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub name: Option<String>,
    pub app_id: Option<String>,
    pub object_id: Option<String>,
    pub tenant_id: Option<String>,
}

pub fn identity_of(token: &AccessToken) -> Option<Identity> {
    let payload = token.secret.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    let s = |k: &str| claims.get(k).and_then(Value::as_str).map(str::to_string);
    Some(Identity {
        name: s("upn")
            .or_else(|| s("unique_name"))
            .or_else(|| s("preferred_username")),
        app_id: s("appid").or_else(|| s("azp")),
        object_id: s("oid"),
        tenant_id: s("tid"),
    })
}

/// A fixed token, for `--dry-run` and tests.
pub struct StaticCredential(pub String);

impl TokenCredential for StaticCredential {
    fn token(&self, _scope: &str) -> Result<AccessToken> {
        Ok(AccessToken {
            secret: self.0.clone(),
            expires_at: SystemTime::now() + Duration::from_secs(3600),
        })
    }

    fn source(&self) -> String {
        "a fixed token".into()
    }
}
