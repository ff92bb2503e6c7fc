//! The registry proper: models, versions, tags, aliases and lineage in SQLite
//! (`$FERROTUNE_HOME/registry.db`), folders under `$FERROTUNE_HOME/artifacts/`.
//!
//! Consistency: every change is one `BEGIN IMMEDIATE` transaction, so two processes never
//! interleave; a version row is inserted only once its folder is in place (a crash leaves at
//! most an unreferenced folder, never a version without files), and a deleted version's folder
//! is moved aside inside the transaction and removed only after the row is gone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;
use serde_json::Value;

use crate::artifacts::{content_key, copy_tree, scratch_name};
use crate::error::{RegistryError, Result};
use crate::spec::{validate_name, Selector, VersionSpec};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL REFERENCES models(name),
    version INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL,
    artifact TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    source_path TEXT NOT NULL,
    lineage TEXT,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS version_tags (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (name, version, key)
);
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT NOT NULL,
    alias TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (name, alias)
);
CREATE INDEX IF NOT EXISTS versions_by_artifact ON versions(artifact);
";

/// One registered version.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelVersion {
    pub name: String,
    pub version: u64,
    pub created_ms: i64,
    pub description: String,
    /// `mlflow` (an MLflow model folder) or `adapter` (a PEFT adapter).
    pub kind: String,
    /// Content key of the stored folder.
    pub artifact: String,
    pub bytes: u64,
    /// The folder it was registered from.
    pub source_path: String,
    pub tags: BTreeMap<String, String>,
    pub aliases: Vec<String>,
    /// Where it came from (`ferrotune export`'s lineage), when known.
    pub lineage: Option<Value>,
    /// The stored folder.
    pub path: PathBuf,
}

/// A model and its versions' summary.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    pub name: String,
    pub versions: usize,
    pub latest: Option<u64>,
    pub aliases: BTreeMap<String, u64>,
}

/// What to register.
#[derive(Debug, Clone, Default)]
pub struct RegisterRequest {
    pub path: PathBuf,
    /// Default: `<base model name>-ultrachat-200k`, as the source document names it.
    pub name: Option<String>,
    /// Default: the Unix-seconds time of registration (the next free one if taken).
    pub version: Option<u64>,
    pub description: String,
    pub tags: Vec<(String, String)>,
}

pub struct Registry {
    home: PathBuf,
    db_path: PathBuf,
    conn: Connection,
}

/// `FERROTUNE_HOME`, else `~/.ferrotune`.
pub fn default_home() -> PathBuf {
    if let Some(h) = std::env::var_os("FERROTUNE_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".ferrotune")
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Registry {
    pub fn open(home: &Path) -> Result<Registry> {
        let artifacts = home.join("artifacts");
        std::fs::create_dir_all(&artifacts).map_err(|e| RegistryError::io(&artifacts, e))?;
        let db_path = home.join("registry.db");
        let db = |e| RegistryError::Db {
            path: db_path.clone(),
            source: e,
        };
        let conn = Connection::open(&db_path).map_err(db)?;
        conn.busy_timeout(Duration::from_secs(60)).map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        let mut reg = Registry {
            home: home.to_path_buf(),
            db_path,
            conn,
        };
        reg.recover()?;
        Ok(reg)
    }

    /// Undo what a killed process left: a folder moved aside by a delete that never committed
    /// goes back (its version still exists), one whose delete did commit is removed, a folder
    /// stored by a register that never committed is removed, and copies abandoned for hours are
    /// dropped. Runs as a writer, so never during another's change.
    fn recover(&mut self) -> Result<()> {
        let artifacts = self.home.join("artifacts");
        let leftovers: Vec<(String, PathBuf)> = std::fs::read_dir(&artifacts)
            .map_err(|e| RegistryError::io(&artifacts, e))?
            .filter_map(|e| e.ok())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect();
        let db = self.db();
        let referenced = |conn: &Connection, key: &str| -> rusqlite::Result<bool> {
            conn.query_row(
                "SELECT 1 FROM versions WHERE artifact = ?1 LIMIT 1",
                params![key],
                |_| Ok(()),
            )
            .optional()
            .map(|r| r.is_some())
        };
        let mut work = false;
        for (name, _) in &leftovers {
            work |= name.starts_with('.') || !referenced(&self.conn, name).map_err(&db)?;
        }
        if !work {
            return Ok(());
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&db)?;
        for (name, path) in leftovers {
            if let Some(rest) = name.strip_prefix(".deleted-") {
                let key = rest.split('-').next().unwrap_or_default();
                let used = referenced(&tx, key).map_err(&db)?;
                let home = artifacts.join(key);
                if used && !home.exists() {
                    tracing::warn!("restoring {} (its delete did not complete)", home.display());
                    std::fs::rename(&path, &home).map_err(|e| RegistryError::io(&home, e))?;
                } else {
                    let _ = std::fs::remove_dir_all(&path);
                }
            } else if !name.starts_with('.') {
                // Stored by a register killed before its commit: no version uses it.
                if !referenced(&tx, &name).map_err(&db)? {
                    let _ = std::fs::remove_dir_all(&path);
                }
            } else if name.starts_with(".incoming-") {
                let age = std::fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .unwrap_or_default();
                if age > Duration::from_secs(6 * 3600) {
                    let _ = std::fs::remove_dir_all(&path);
                }
            }
        }
        tx.commit().map_err(&db)
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    fn db(&self) -> impl Fn(rusqlite::Error) -> RegistryError {
        let path = self.db_path.clone();
        move |e| RegistryError::Db {
            path: path.clone(),
            source: e,
        }
    }

    fn artifact_path(&self, key: &str) -> PathBuf {
        self.home.join("artifacts").join(key)
    }

    /// Register a folder written by `ferrotune export` (or any MLflow model folder / PEFT adapter).
    pub fn register(&mut self, req: &RegisterRequest) -> Result<ModelVersion> {
        let (kind, lineage) = inspect(&req.path)?;
        let name = match &req.name {
            Some(n) => n.clone(),
            None => default_name(lineage.as_ref()).ok_or_else(|| {
                RegistryError::Usage(format!(
                    "{} does not say which base model it came from; pass --name",
                    req.path.display()
                ))
            })?,
        };
        validate_name(&name)?;
        for (k, _) in &req.tags {
            if k.is_empty() {
                return Err(RegistryError::Usage("--tag needs KEY=VALUE".into()));
            }
        }
        let (key, bytes) = content_key(&req.path)?;
        let target = self.artifact_path(&key);
        // Copy outside the transaction (it can take minutes); a stored copy is reused.
        let staged = if target.is_dir() {
            None
        } else {
            let tmp = scratch_name(&self.home.join("artifacts"), "incoming");
            copy_tree(&req.path, &tmp)?;
            Some(tmp)
        };
        let source_path = std::fs::canonicalize(&req.path)
            .unwrap_or_else(|_| req.path.clone())
            .display()
            .to_string();
        let db = self.db();
        let db_path = self.db_path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&db)?;
        match staged {
            Some(tmp) if !target.is_dir() => {
                std::fs::rename(&tmp, &target).map_err(|e| RegistryError::io(&target, e))?
            }
            Some(tmp) => {
                let _ = std::fs::remove_dir_all(tmp);
            }
            // Deleted by another process since we looked: store it again.
            None if !target.is_dir() => {
                let tmp = scratch_name(&self.home.join("artifacts"), "incoming");
                copy_tree(&req.path, &tmp)?;
                std::fs::rename(&tmp, &target).map_err(|e| RegistryError::io(&target, e))?;
            }
            None => {}
        }
        let now = now_ms();
        tx.execute(
            "INSERT OR IGNORE INTO models (name, created_ms) VALUES (?1, ?2)",
            params![name, now],
        )
        .map_err(&db)?;
        let taken = |v: u64| -> rusqlite::Result<bool> {
            tx.query_row(
                "SELECT 1 FROM versions WHERE name = ?1 AND version = ?2",
                params![name, v as i64],
                |_| Ok(()),
            )
            .optional()
            .map(|r| r.is_some())
        };
        let version = match req.version {
            Some(v) => {
                if taken(v).map_err(&db)? {
                    return Err(RegistryError::Usage(format!(
                        "{name}:{v} is already registered; pick another --version or leave it out"
                    )));
                }
                v
            }
            None => {
                let mut v = (now / 1000) as u64;
                while taken(v).map_err(&db)? {
                    v += 1;
                }
                v
            }
        };
        tx.execute(
            "INSERT INTO versions (name, version, created_ms, description, kind, artifact, bytes, source_path, lineage)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                name,
                version as i64,
                now,
                req.description,
                kind,
                key,
                bytes as i64,
                source_path,
                lineage.as_ref().map(Value::to_string)
            ],
        )
        .map_err(&db)?;
        for (k, v) in &req.tags {
            tx.execute(
                "INSERT OR REPLACE INTO version_tags (name, version, key, value) VALUES (?1, ?2, ?3, ?4)",
                params![name, version as i64, k, v],
            )
            .map_err(&db)?;
        }
        tx.commit().map_err(|e| RegistryError::Db {
            path: db_path,
            source: e,
        })?;
        self.version(&name, version)
    }

    fn version(&self, name: &str, version: u64) -> Result<ModelVersion> {
        let db = self.db();
        let row = self
            .conn
            .query_row(
                "SELECT created_ms, description, kind, artifact, bytes, source_path, lineage
                 FROM versions WHERE name = ?1 AND version = ?2",
                params![name, version as i64],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, String>(5)?,
                        r.get::<_, Option<String>>(6)?,
                    ))
                },
            )
            .optional()
            .map_err(&db)?;
        let Some((created_ms, description, kind, artifact, bytes, source_path, lineage)) = row
        else {
            return Err(RegistryError::Usage(format!(
                "{name}:{version} is not registered (see `ferrotune models show {name}`)"
            )));
        };
        let mut stmt = self
            .conn
            .prepare("SELECT key, value FROM version_tags WHERE name = ?1 AND version = ?2")
            .map_err(&db)?;
        let tags = stmt
            .query_map(params![name, version as i64], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(&db)?
            .collect::<rusqlite::Result<BTreeMap<String, String>>>()
            .map_err(&db)?;
        let mut stmt = self
            .conn
            .prepare("SELECT alias FROM aliases WHERE name = ?1 AND version = ?2 ORDER BY alias")
            .map_err(&db)?;
        let aliases = stmt
            .query_map(params![name, version as i64], |r| r.get(0))
            .map_err(&db)?
            .collect::<rusqlite::Result<Vec<String>>>()
            .map_err(&db)?;
        Ok(ModelVersion {
            name: name.to_string(),
            version,
            created_ms,
            description,
            kind,
            path: self.artifact_path(&artifact),
            artifact,
            bytes: bytes as u64,
            source_path,
            tags,
            aliases,
            lineage: lineage.and_then(|l| serde_json::from_str(&l).ok()),
        })
    }

    /// The version `spec` names.
    pub fn get(&self, spec: &VersionSpec) -> Result<ModelVersion> {
        let db = self.db();
        let name = &spec.name;
        let version: Option<i64> = match &spec.selector {
            Selector::Version(v) => Some(*v as i64),
            Selector::Latest => self
                .conn
                .query_row(
                    "SELECT MAX(version) FROM versions WHERE name = ?1",
                    params![name],
                    |r| r.get(0),
                )
                .map_err(&db)?,
            Selector::Alias(a) => self
                .conn
                .query_row(
                    "SELECT version FROM aliases WHERE name = ?1 AND alias = ?2",
                    params![name, a],
                    |r| r.get(0),
                )
                .optional()
                .map_err(&db)?,
        };
        match version {
            Some(v) => self.version(name, v as u64),
            None => Err(RegistryError::Usage(match &spec.selector {
                Selector::Alias(a) => format!("{name} has no alias {a:?}"),
                _ => format!("{name} has no registered versions (see `ferrotune models list`)"),
            })),
        }
    }

    /// Every version of `name`, newest first.
    pub fn versions(&self, name: &str) -> Result<Vec<ModelVersion>> {
        let db = self.db();
        let mut stmt = self
            .conn
            .prepare("SELECT version FROM versions WHERE name = ?1 ORDER BY version DESC")
            .map_err(&db)?;
        let list = stmt
            .query_map(params![name], |r| r.get::<_, i64>(0))
            .map_err(&db)?
            .collect::<rusqlite::Result<Vec<i64>>>()
            .map_err(&db)?;
        list.into_iter()
            .map(|v| self.version(name, v as u64))
            .collect()
    }

    /// Every model, by name.
    pub fn list(&self) -> Result<Vec<ModelSummary>> {
        let db = self.db();
        let mut stmt = self
            .conn
            .prepare(
                "SELECT m.name, COUNT(v.version), MAX(v.version) FROM models m
                 LEFT JOIN versions v ON v.name = m.name GROUP BY m.name ORDER BY m.name",
            )
            .map_err(&db)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                ))
            })
            .map_err(&db)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(&db)?;
        let mut out = Vec::new();
        for (name, count, latest) in rows {
            let mut stmt = self
                .conn
                .prepare("SELECT alias, version FROM aliases WHERE name = ?1")
                .map_err(&db)?;
            let aliases = stmt
                .query_map(params![name], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
                })
                .map_err(&db)?
                .collect::<rusqlite::Result<BTreeMap<_, _>>>()
                .map_err(&db)?;
            out.push(ModelSummary {
                name,
                versions: count as usize,
                latest: latest.map(|v| v as u64),
                aliases,
            });
        }
        Ok(out)
    }

    /// Point `alias` at `name:version` (moving it if it pointed elsewhere).
    pub fn set_alias(&mut self, name: &str, alias: &str, version: u64) -> Result<()> {
        validate_name(alias).map_err(|_| {
            RegistryError::Usage(format!(
                "alias {alias:?}: use letters, digits, '-', '_' and '.'"
            ))
        })?;
        if alias == "latest" || alias.chars().all(|c| c.is_ascii_digit()) {
            return Err(RegistryError::Usage(format!(
                "alias {alias:?} would be read as a version; pick a name such as prod or champion"
            )));
        }
        self.version(name, version)?;
        self.conn
            .execute(
                "INSERT OR REPLACE INTO aliases (name, alias, version) VALUES (?1, ?2, ?3)",
                params![name, alias, version as i64],
            )
            .map_err(self.db())?;
        Ok(())
    }

    pub fn remove_alias(&mut self, name: &str, alias: &str) -> Result<()> {
        let n = self
            .conn
            .execute(
                "DELETE FROM aliases WHERE name = ?1 AND alias = ?2",
                params![name, alias],
            )
            .map_err(self.db())?;
        if n == 0 {
            return Err(RegistryError::Usage(format!(
                "{name} has no alias {alias:?}"
            )));
        }
        Ok(())
    }

    /// Delete one version; its folder goes once no other version shares it.
    pub fn delete_version(&mut self, name: &str, version: u64) -> Result<ModelVersion> {
        let v = self.version(name, version)?;
        self.delete_rows(name, Some(version))?;
        Ok(v)
    }

    /// Delete a model with all its versions.
    pub fn delete_model(&mut self, name: &str) -> Result<Vec<ModelVersion>> {
        let versions = self.versions(name)?;
        let exists: bool = self
            .conn
            .query_row(
                "SELECT 1 FROM models WHERE name = ?1",
                params![name],
                |_| Ok(()),
            )
            .optional()
            .map_err(self.db())?
            .is_some();
        if !exists {
            return Err(RegistryError::Usage(format!("{name} is not registered")));
        }
        self.delete_rows(name, None)?;
        Ok(versions)
    }

    fn delete_rows(&mut self, name: &str, version: Option<u64>) -> Result<()> {
        let db = self.db();
        let db_path = self.db_path.clone();
        let artifacts_dir = self.home.join("artifacts");
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&db)?;
        let keys: Vec<String> = {
            let (sql, v) = match version {
                Some(v) => (
                    "SELECT artifact FROM versions WHERE name = ?1 AND version = ?2",
                    v as i64,
                ),
                None => (
                    "SELECT artifact FROM versions WHERE name = ?1 AND ?2 = ?2",
                    0,
                ),
            };
            let mut stmt = tx.prepare(sql).map_err(&db)?;
            let keys = stmt
                .query_map(params![name, v], |r| r.get(0))
                .map_err(&db)?
                .collect::<rusqlite::Result<Vec<String>>>()
                .map_err(&db)?;
            keys
        };
        match version {
            Some(v) => {
                for table in ["versions", "version_tags", "aliases"] {
                    tx.execute(
                        &format!("DELETE FROM {table} WHERE name = ?1 AND version = ?2"),
                        params![name, v as i64],
                    )
                    .map_err(&db)?;
                }
            }
            None => {
                for table in ["versions", "version_tags", "aliases", "models"] {
                    tx.execute(
                        &format!("DELETE FROM {table} WHERE name = ?1"),
                        params![name],
                    )
                    .map_err(&db)?;
                }
            }
        }
        // Folders no remaining version uses are moved aside now and removed after the commit.
        let mut trash = Vec::new();
        for key in keys {
            let used: bool = tx
                .query_row(
                    "SELECT 1 FROM versions WHERE artifact = ?1 LIMIT 1",
                    params![key],
                    |_| Ok(()),
                )
                .optional()
                .map_err(&db)?
                .is_some();
            let dir = artifacts_dir.join(&key);
            if !used && dir.is_dir() {
                let aside = scratch_name(&artifacts_dir, &format!("deleted-{key}"));
                std::fs::rename(&dir, &aside).map_err(|e| RegistryError::io(&dir, e))?;
                trash.push(aside);
            }
        }
        tx.commit().map_err(|e| RegistryError::Db {
            path: db_path,
            source: e,
        })?;
        for dir in trash {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!("could not remove {}: {e}", dir.display());
            }
        }
        Ok(())
    }

    /// Copy a version's folder to `out` (atomically; an existing `out` only with `force`).
    pub fn export(&self, spec: &VersionSpec, out: &Path, force: bool) -> Result<ModelVersion> {
        let v = self.get(spec)?;
        let staging = ferrotune_export::output::Staging::begin(out, force)?;
        copy_tree(&v.path, &staging.dir)?;
        staging.commit()?;
        Ok(v)
    }
}

/// `mlflow` or `adapter`, and the lineage the folder carries.
pub fn inspect(dir: &Path) -> Result<(&'static str, Option<Value>)> {
    use ferrotune_export::{mlmodel, model_card};
    if !dir.is_dir() {
        return Err(RegistryError::Usage(format!(
            "--path {}: no such folder",
            dir.display()
        )));
    }
    if dir.join(mlmodel::MLMODEL).is_file() {
        let m = mlmodel::read_mlmodel(dir)?;
        let lineage = m.get("metadata").and_then(|x| x.get("ferrotune")).cloned();
        return Ok(("mlflow", lineage));
    }
    if dir.join("adapter_config.json").is_file() {
        let lineage = std::fs::read_to_string(dir.join(model_card::LINEAGE_FILE))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        return Ok(("adapter", lineage));
    }
    Err(RegistryError::Usage(format!(
        "--path {}: neither an MLflow model folder (MLmodel) nor a PEFT adapter (adapter_config.json); make one with `ferrotune export`",
        dir.display()
    )))
}

/// `<base model name>-ultrachat-200k`: the source document's registered name.
pub fn default_name(lineage: Option<&Value>) -> Option<String> {
    let base = lineage?.get("base_model")?.as_str()?;
    let short = base.trim_end_matches('/').rsplit('/').next()?;
    let short: String = short
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    (!short.is_empty()).then(|| format!("{short}-ultrachat-200k"))
}
