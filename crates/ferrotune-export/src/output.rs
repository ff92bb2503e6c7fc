//! An export appears whole or not at all: it is written into a hidden sibling of the target and
//! renamed into place; an existing target is replaced only with `force`, and then only once the
//! new folder is complete. A failed or interrupted export leaves no partial folder behind.

use std::path::{Path, PathBuf};

use crate::error::{ExportError, Result};

pub struct Staging {
    pub dir: PathBuf,
    target: PathBuf,
    force: bool,
    done: bool,
}

impl Staging {
    pub fn begin(target: &Path, force: bool) -> Result<Staging> {
        if target.exists() && !force {
            return Err(ExportError::Usage(format!(
                "{} already exists; pass --force to replace it",
                target.display()
            )));
        }
        let name = target
            .file_name()
            .ok_or_else(|| {
                ExportError::Usage(format!("--out {}: not a folder name", target.display()))
            })?
            .to_string_lossy()
            .into_owned();
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| ExportError::io(&parent, e))?;
        let dir = parent.join(format!(".{name}.partial-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| ExportError::io(&dir, e))?;
        }
        std::fs::create_dir_all(&dir).map_err(|e| ExportError::io(&dir, e))?;
        Ok(Staging {
            dir,
            target: target.to_path_buf(),
            force,
            done: false,
        })
    }

    /// Move the finished folder into place (swapping out an old one under `force`).
    pub fn commit(mut self) -> Result<PathBuf> {
        if self.target.exists() {
            if !self.force {
                return Err(ExportError::Usage(format!(
                    "{} appeared while exporting; pass --force to replace it",
                    self.target.display()
                )));
            }
            let old = self.dir.with_extension("old");
            std::fs::rename(&self.target, &old).map_err(|e| ExportError::io(&self.target, e))?;
            std::fs::rename(&self.dir, &self.target)
                .map_err(|e| ExportError::io(&self.target, e))?;
            std::fs::remove_dir_all(&old).map_err(|e| ExportError::io(&old, e))?;
        } else {
            std::fs::rename(&self.dir, &self.target)
                .map_err(|e| ExportError::io(&self.target, e))?;
        }
        self.done = true;
        Ok(self.target.clone())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Bytes of every file under `dir` except the top-level `skip` names.
pub fn folder_size(dir: &Path, skip: &[&str]) -> Result<u64> {
    fn walk(dir: &Path, skip: &[&str], top: bool, total: &mut u64) -> Result<()> {
        for entry in std::fs::read_dir(dir).map_err(|e| ExportError::io(dir, e))? {
            let entry = entry.map_err(|e| ExportError::io(dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if top && skip.contains(&name.as_str()) {
                continue;
            }
            let meta = entry
                .metadata()
                .map_err(|e| ExportError::io(entry.path(), e))?;
            if meta.is_dir() {
                walk(&entry.path(), skip, false, total)?;
            } else {
                *total += meta.len();
            }
        }
        Ok(())
    }
    let mut total = 0;
    walk(dir, skip, true, &mut total)?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_staging_leaves_nothing_and_force_is_needed_to_replace() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        {
            let s = Staging::begin(&target, false).unwrap();
            std::fs::write(s.dir.join("half"), b"x").unwrap();
        }
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
        let s = Staging::begin(&target, false).unwrap();
        std::fs::write(s.dir.join("a"), b"first").unwrap();
        s.commit().unwrap();
        let err = Staging::begin(&target, false).err().unwrap();
        assert!(err.to_string().contains("--force"), "{err}");
        let s = Staging::begin(&target, true).unwrap();
        std::fs::write(s.dir.join("b"), b"second").unwrap();
        s.commit().unwrap();
        assert!(!target.join("a").exists());
        assert_eq!(std::fs::read(target.join("b")).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
        assert_eq!(folder_size(&target, &[]).unwrap(), 6);
        assert_eq!(folder_size(&target, &["b"]).unwrap(), 0);
    }
}
