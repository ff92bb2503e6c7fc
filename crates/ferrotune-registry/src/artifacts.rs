//! Content-addressed model folders: `artifacts/<key>/` where the key is a blake3 hash over every
//! file's relative path, size and contents, so the same folder registered twice is stored once.
//! Folders are copied into a hidden temporary name and renamed into place.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{RegistryError, Result};

/// Files under `dir`, as sorted relative paths.
pub fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        for entry in std::fs::read_dir(dir).map_err(|e| RegistryError::io(dir, e))? {
            let entry = entry.map_err(|e| RegistryError::io(dir, e))?;
            let path = entry.path();
            let kind = entry.file_type().map_err(|e| RegistryError::io(&path, e))?;
            if kind.is_dir() {
                walk(root, &path, out)?;
            } else if kind.is_file() {
                out.push(path.strip_prefix(root).expect("under root").to_path_buf());
            } else {
                return Err(RegistryError::Usage(format!(
                    "{}: links and special files cannot be registered; copy the folder with its files first",
                    path.display()
                )));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// The content key of a folder and its total size in bytes.
pub fn content_key(dir: &Path) -> Result<(String, u64)> {
    let mut tree = blake3::Hasher::new();
    let mut total = 0u64;
    for rel in files(dir)? {
        let path = dir.join(&rel);
        let mut file = std::fs::File::open(&path).map_err(|e| RegistryError::io(&path, e))?;
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| RegistryError::io(&path, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            size += n as u64;
        }
        let name = rel.to_string_lossy();
        tree.update(&(name.len() as u64).to_le_bytes());
        tree.update(name.as_bytes());
        tree.update(&size.to_le_bytes());
        tree.update(h.finalize().as_bytes());
        total += size;
    }
    Ok((tree.finalize().to_hex().to_string(), total))
}

/// Copy the files of `src` into `dst` (created), syncing each file.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    for rel in files(src)? {
        let (from, to) = (src.join(&rel), dst.join(&rel));
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| RegistryError::io(parent, e))?;
        }
        std::fs::copy(&from, &to).map_err(|e| RegistryError::io(&from, e))?;
        std::fs::File::open(&to)
            .and_then(|f| f.sync_all())
            .map_err(|e| RegistryError::io(&to, e))?;
    }
    std::fs::create_dir_all(dst).map_err(|e| RegistryError::io(dst, e))
}

/// A fresh hidden name beside `target` for staging or trashing.
pub fn scratch_name(parent: &Path, what: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    parent.join(format!(
        ".{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_depends_on_names_and_contents_not_on_where_the_folder_is() {
        let a = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(a.path().join("model")).unwrap();
        std::fs::write(a.path().join("MLmodel"), b"flavors: {}").unwrap();
        std::fs::write(a.path().join("model/w"), b"1234").unwrap();
        let b = tempfile::tempdir().unwrap();
        copy_tree(a.path(), b.path()).unwrap();
        let (ka, size) = content_key(a.path()).unwrap();
        assert_eq!(size, 15);
        assert_eq!(content_key(b.path()).unwrap().0, ka);
        std::fs::write(b.path().join("model/w"), b"1235").unwrap();
        assert_ne!(content_key(b.path()).unwrap().0, ka);
        std::fs::write(b.path().join("model/w"), b"1234").unwrap();
        std::fs::rename(b.path().join("model/w"), b.path().join("model/v")).unwrap();
        assert_ne!(content_key(b.path()).unwrap().0, ka);
    }
}
