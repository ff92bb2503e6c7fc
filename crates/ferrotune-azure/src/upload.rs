//! Folder uploads as azure-ai-ml lays them out: `LocalUpload/{hash}/{folder}/{relpath}`, where the
//! hash is an MD5 over the sorted tree (names, then bytes). Big files go up as blocks in
//! parallel; everything is resumable: a finished upload is marked by `upload_status=completed`
//! on its first file (written last), finished files are recognised by their Content-MD5, and a
//! file cut off mid-way keeps the blocks the service already staged (block ids carry the
//! block's own MD5, so a changed file never reuses a stale block).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use md5::{Digest, Md5};

use crate::blob::BlobContainer;
use crate::error::{AzureError, Result};

pub const DEFAULT_BLOCK_SIZE: u64 = 32 * 1024 * 1024;
pub const COMPLETION_KEY: &str = "upload_status";
pub const COMPLETION_VALUE: &str = "completed";

#[derive(Debug, Clone)]
pub struct LocalFile {
    /// Path relative to the folder, with `/` separators.
    pub rel: String,
    pub path: PathBuf,
    pub len: u64,
    pub md5: [u8; 16],
}

#[derive(Debug, Clone)]
pub struct FolderPlan {
    /// azure-ai-ml's content hash of the folder.
    pub hash: String,
    /// Where it goes in the container: `LocalUpload/{hash}/{folder name}`.
    pub prefix: String,
    pub files: Vec<LocalFile>,
}

impl FolderPlan {
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.len).sum()
    }

    pub fn blob_name(&self, file: &LocalFile) -> String {
        format!("{}/{}", self.prefix, file.rel)
    }
}

/// Reads the folder once: the tree hash and every file's MD5 in the same pass.
pub fn scan(dir: &Path) -> Result<FolderPlan> {
    let meta = std::fs::metadata(dir).map_err(|e| AzureError::io(dir, e))?;
    if !meta.is_dir() {
        return Err(AzureError::Usage(format!(
            "{}: not a folder",
            dir.display()
        )));
    }
    let ignore = IgnoreRules::read(dir)?;
    let mut tree = Md5::new();
    let mut files = Vec::new();
    walk(dir, dir, &ignore, &mut tree, &mut files)?;
    if files.is_empty() {
        return Err(AzureError::Usage(format!(
            "{}: nothing to upload (empty folder)",
            dir.display()
        )));
    }
    let hash = hex(&tree.finalize());
    let canonical = dir.canonicalize().map_err(|e| AzureError::io(dir, e))?;
    let folder = canonical
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("upload")
        .to_string();
    Ok(FolderPlan {
        prefix: format!("LocalUpload/{hash}/{folder}"),
        hash,
        files,
    })
}

/// One file, uploaded as azure-ai-ml uploads a file input: `LocalUpload/{hash}/{name}`.
pub fn scan_file(path: &Path) -> Result<FolderPlan> {
    let meta = std::fs::metadata(path).map_err(|e| AzureError::io(path, e))?;
    if !meta.is_file() {
        return Err(AzureError::Usage(format!("{}: not a file", path.display())));
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| AzureError::Usage(format!("{}: no file name", path.display())))?
        .to_string();
    let bytes = std::fs::read(path).map_err(|e| AzureError::io(path, e))?;
    let mut tree = Md5::new();
    tree.update(name.as_bytes());
    tree.update(&bytes);
    let hash = hex(&tree.finalize());
    let file = LocalFile {
        rel: name,
        path: path.to_path_buf(),
        len: bytes.len() as u64,
        md5: Md5::digest(&bytes).into(),
    };
    Ok(FolderPlan {
        prefix: format!("LocalUpload/{hash}"),
        hash,
        files: vec![file],
    })
}

fn walk(
    root: &Path,
    dir: &Path,
    ignore: &IgnoreRules,
    tree: &mut Md5,
    files: &mut Vec<LocalFile>,
) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| AzureError::io(dir, e))?
        .collect::<std::io::Result<_>>()
        .map_err(|e| AzureError::io(dir, e))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        let rel = path
            .strip_prefix(root)
            .expect("under root")
            .to_string_lossy()
            .replace('\\', "/");
        let is_dir = entry
            .file_type()
            .map_err(|e| AzureError::io(&path, e))?
            .is_dir();
        if ignore.ignores(&rel, &name, is_dir) {
            continue;
        }
        tree.update(name.as_bytes());
        if is_dir {
            walk(root, &path, ignore, tree, files)?;
            continue;
        }
        let mut file = File::open(&path).map_err(|e| AzureError::io(&path, e))?;
        let mut own = Md5::new();
        let mut buf = vec![0u8; 8 << 20];
        let mut len = 0u64;
        loop {
            let n = read_full(&mut file, &mut buf).map_err(|e| AzureError::io(&path, e))?;
            if n == 0 {
                break;
            }
            // The tree hash and the file's own MD5 over the same bytes, on two cores.
            let chunk = &buf[..n];
            std::thread::scope(|scope| {
                scope.spawn(|| own.update(chunk));
                tree.update(chunk);
            });
            len += n as u64;
        }
        files.push(LocalFile {
            rel,
            path,
            len,
            md5: own.finalize().into(),
        });
    }
    Ok(())
}

/// `.amlignore` (or else `.gitignore`) at the folder's top: comments, `name`, `*.ext`, `dir/`
/// and `/anchored` patterns with `*` and `?` (negations are not supported and say so).
struct IgnoreRules {
    patterns: Vec<(String, bool, bool)>,
}

impl IgnoreRules {
    fn read(dir: &Path) -> Result<Self> {
        let file = [".amlignore", ".gitignore"]
            .iter()
            .map(|n| dir.join(n))
            .find(|p| p.is_file());
        let Some(file) = file else {
            return Ok(IgnoreRules {
                patterns: Vec::new(),
            });
        };
        let text = std::fs::read_to_string(&file).map_err(|e| AzureError::io(&file, e))?;
        let mut patterns = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.starts_with('!') {
                return Err(AzureError::Usage(format!(
                    "{} line {}: `!` patterns are not supported; list what to skip instead",
                    file.display(),
                    i + 1
                )));
            }
            let dir_only = line.ends_with('/');
            let anchored = line.starts_with('/') || line.trim_end_matches('/').contains('/');
            patterns.push((line.trim_matches('/').to_string(), dir_only, anchored));
        }
        Ok(IgnoreRules { patterns })
    }

    fn ignores(&self, rel: &str, name: &str, is_dir: bool) -> bool {
        self.patterns.iter().any(|(p, dir_only, anchored)| {
            (!dir_only || is_dir)
                && if *anchored {
                    glob(p, rel)
                } else {
                    glob(p, name)
                }
        })
    }
}

fn glob(pattern: &str, text: &str) -> bool {
    fn go(p: &[u8], t: &[u8]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], t) || (!t.is_empty() && t[0] != b'/' && go(p, &t[1..])),
            (Some(b'?'), Some(c)) if *c != b'/' => go(&p[1..], &t[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &t[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), text.as_bytes())
}

#[derive(Debug, Clone)]
pub struct UploadOptions {
    pub block_size: u64,
    pub parallelism: usize,
    /// Set (by Ctrl-C, say) to stop after the blocks in flight; a rerun picks up from there.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            block_size: DEFAULT_BLOCK_SIZE,
            parallelism: 8,
            cancel: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UploadReport {
    /// The whole folder was there already (completion marker found).
    pub already_complete: bool,
    pub files_uploaded: usize,
    pub files_skipped: usize,
    pub blocks_uploaded: usize,
    pub blocks_reused: usize,
    pub bytes_sent: u64,
}

enum Work {
    Whole(usize),
    Block { file: usize, index: usize },
}

/// Uploads (or finishes uploading) the folder. `progress` gets (bytes sent, bytes to send).
pub fn upload(
    container: &BlobContainer,
    plan: &FolderPlan,
    opts: &UploadOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<UploadReport> {
    let block_size = opts.block_size.max(1);
    let first = plan.blob_name(&plan.files[0]);
    if container.is_dry_run() {
        return Ok(describe_upload(container, plan, block_size));
    }
    if let Some(props) = container.properties(&first)? {
        if props.metadata.get(COMPLETION_KEY).map(String::as_str) == Some(COMPLETION_VALUE) {
            return Ok(UploadReport {
                already_complete: true,
                files_skipped: plan.files.len(),
                ..Default::default()
            });
        }
    }
    let mut report = UploadReport::default();
    let mut work = Vec::new();
    // Per file: the block ids to commit (empty for one-shot files) and whether it needs work.
    let mut block_ids: Vec<Vec<String>> = vec![Vec::new(); plan.files.len()];
    let mut pending = vec![false; plan.files.len()];
    let mut to_send = 0u64;
    for (i, file) in plan.files.iter().enumerate() {
        let name = plan.blob_name(file);
        let done = container.properties(&name)?.is_some_and(|p| {
            p.len == file.len && p.content_md5.as_deref() == Some(&B64.encode(file.md5))
        });
        if done {
            report.files_skipped += 1;
            continue;
        }
        pending[i] = true;
        if file.len <= block_size {
            work.push(Work::Whole(i));
            to_send += file.len;
            continue;
        }
        let staged: std::collections::HashSet<(String, u64)> =
            container.uncommitted_blocks(&name)?.into_iter().collect();
        let blocks = file.len.div_ceil(block_size) as usize;
        for index in 0..blocks {
            let (offset, len) = block_range(file.len, block_size, index);
            // Block ids carry the block's MD5; it is worked out ahead only when the service
            // holds staged blocks that might be reused, else while the block is sent.
            let id = if staged.is_empty() {
                String::new()
            } else {
                block_id(index, &md5_of_range(&file.path, offset, len)?)
            };
            if !id.is_empty() && staged.contains(&(id.clone(), len)) {
                report.blocks_reused += 1;
            } else {
                work.push(Work::Block { file: i, index });
                to_send += len;
            }
            block_ids[i].push(id);
        }
    }

    let block_ids = Mutex::new(block_ids);
    let next = AtomicUsize::new(0);
    let sent = AtomicU64::new(0);
    let first_error: Mutex<Option<AzureError>> = Mutex::new(None);
    let blocks_sent = AtomicUsize::new(0);
    progress(0, to_send);
    std::thread::scope(|scope| {
        for _ in 0..opts.parallelism.max(1).min(work.len().max(1)) {
            scope.spawn(|| loop {
                if first_error.lock().expect("error slot").is_some() {
                    return;
                }
                if opts.cancel.as_ref().is_some_and(|c| c.load(Ordering::SeqCst)) {
                    first_error.lock().expect("error slot").get_or_insert(AzureError::Operation(
                        "upload interrupted; run the same command again to finish it (finished blocks are kept)".into(),
                    ));
                    return;
                }
                let Some(item) = work.get(next.fetch_add(1, Ordering::SeqCst)) else {
                    return;
                };
                let outcome = match item {
                    Work::Whole(i) => {
                        let f = &plan.files[*i];
                        read_range(&f.path, 0, f.len).and_then(|data| {
                            let n = data.len() as u64;
                            container
                                .put_blob(&plan.blob_name(f), data, &f.md5)
                                .map(|_| n)
                        })
                    }
                    Work::Block { file, index } => {
                        let f = &plan.files[*file];
                        let (offset, len) = block_range(f.len, block_size, *index);
                        read_range(&f.path, offset, len).and_then(|data| {
                            let md5: [u8; 16] = Md5::digest(&data).into();
                            let id = block_id(*index, &md5);
                            container
                                .put_block(&plan.blob_name(f), &id, data, &md5)
                                .map(|_| {
                                    block_ids.lock().expect("block ids")[*file][*index] = id;
                                    blocks_sent.fetch_add(1, Ordering::SeqCst);
                                    len
                                })
                        })
                    }
                };
                match outcome {
                    Ok(n) => progress(sent.fetch_add(n, Ordering::SeqCst) + n, to_send),
                    Err(e) => {
                        first_error.lock().expect("error slot").get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().expect("error slot") {
        return Err(e);
    }
    report.blocks_uploaded = blocks_sent.into_inner();
    report.bytes_sent = sent.into_inner();
    let block_ids = block_ids.into_inner().expect("block ids");
    for (i, file) in plan.files.iter().enumerate() {
        if !pending[i] {
            continue;
        }
        report.files_uploaded += 1;
        let name = plan.blob_name(file);
        if !block_ids[i].is_empty() {
            container.put_block_list(&name, &block_ids[i], &file.md5)?;
        }
        let props = container.properties(&name)?;
        if props.as_ref().map(|p| p.len) != Some(file.len) {
            return Err(AzureError::Operation(format!(
                "{name}: the service holds {} bytes, {} has {}",
                props
                    .map(|p| p.len.to_string())
                    .unwrap_or_else(|| "no".into()),
                file.path.display(),
                file.len
            )));
        }
    }
    // Written last: its presence is what makes the next run skip the whole folder.
    container.set_metadata(
        &first,
        &[(COMPLETION_KEY, COMPLETION_VALUE), ("upload_version", "2")],
    )?;
    Ok(report)
}

/// A dry run's account of an upload: one line per file instead of one request per block.
fn describe_upload(container: &BlobContainer, plan: &FolderPlan, block_size: u64) -> UploadReport {
    let mut report = UploadReport::default();
    for file in &plan.files {
        let url = container.blob_url(&plan.blob_name(file));
        let md5 = B64.encode(file.md5);
        if file.len <= block_size {
            container.note(&format!(
                "PUT {url}  (Put Blob, {} bytes, Content-MD5 {md5})",
                file.len
            ));
        } else {
            let blocks = file.len.div_ceil(block_size);
            container.note(&format!(
                "PUT {url}?comp=block  (Put Block ×{blocks} of up to {block_size} bytes, each with its Content-MD5)\n\
                 PUT {url}?comp=blocklist  (Put Block List, x-ms-blob-content-md5 {md5})"
            ));
            report.blocks_uploaded += blocks as usize;
        }
        report.files_uploaded += 1;
        report.bytes_sent += file.len;
    }
    let first = container.blob_url(&plan.blob_name(&plan.files[0]));
    container.note(&format!(
        "PUT {first}?comp=metadata  (x-ms-meta-{COMPLETION_KEY}: {COMPLETION_VALUE}, last)"
    ));
    report
}

/// Fills `buf` unless the file ends first (`read` may return less than asked).
fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

fn block_range(len: u64, block_size: u64, index: usize) -> (u64, u64) {
    let offset = index as u64 * block_size;
    (offset, block_size.min(len - offset))
}

/// Same length for every block of a blob (the service requires it): index, then the block's MD5.
fn block_id(index: usize, md5: &[u8; 16]) -> String {
    B64.encode(format!("{index:06}-{}", hex(&md5[..8])))
}

fn md5_of_range(path: &Path, offset: u64, len: u64) -> Result<[u8; 16]> {
    let mut file = File::open(path).map_err(|e| AzureError::io(path, e))?;
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| AzureError::io(path, e))?;
    let mut hasher = Md5::new();
    let mut left = len;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = (left as usize).min(buf.len());
        file.read_exact(&mut buf[..n])
            .map_err(|e| AzureError::io(path, e))?;
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(hasher.finalize().into())
}

fn read_range(path: &Path, offset: u64, len: u64) -> Result<Bytes> {
    let mut file = File::open(path).map_err(|e| AzureError::io(path, e))?;
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| AzureError::io(path, e))?;
    let mut data = vec![0u8; len as usize];
    file.read_exact(&mut data)
        .map_err(|e| AzureError::io(path, e))?;
    Ok(Bytes::from(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_covers_names_and_bytes_in_sorted_order_and_ignores_listed_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("model_folder");
        std::fs::create_dir_all(root.join("model")).unwrap();
        std::fs::write(root.join("MLmodel"), b"flavors: {}\n").unwrap();
        std::fs::write(root.join("model/a.bin"), b"abc").unwrap();
        let plan = scan(&root).unwrap();
        // The tree hash by hand: entries sorted by name, a folder's name then its contents.
        let mut h = Md5::new();
        h.update(b"MLmodel");
        h.update(b"flavors: {}\n");
        h.update(b"model");
        h.update(b"a.bin");
        h.update(b"abc");
        assert_eq!(plan.hash, hex(&h.finalize()));
        assert_eq!(
            plan.prefix,
            format!("LocalUpload/{}/model_folder", plan.hash)
        );
        assert_eq!(
            plan.files
                .iter()
                .map(|f| f.rel.as_str())
                .collect::<Vec<_>>(),
            ["MLmodel", "model/a.bin"]
        );
        assert_eq!(plan.files[1].md5, <[u8; 16]>::from(Md5::digest(b"abc")));

        std::fs::write(
            root.join(".amlignore"),
            "# scratch\n*.tmp\n/model/skip.bin\n",
        )
        .unwrap();
        std::fs::write(root.join("x.tmp"), b"scratch").unwrap();
        std::fs::write(root.join("model/skip.bin"), b"skip").unwrap();
        let with_ignored = scan(&root).unwrap();
        let rels: Vec<_> = with_ignored.files.iter().map(|f| f.rel.as_str()).collect();
        assert_eq!(rels, [".amlignore", "MLmodel", "model/a.bin"]);
    }

    #[test]
    fn block_ids_have_one_length_and_change_with_content() {
        let a = block_id(0, &[1; 16]);
        let b = block_id(123, &[2; 16]);
        assert_eq!(a.len(), b.len());
        assert_ne!(block_id(5, &[1; 16]), block_id(5, &[3; 16]));
        assert_eq!(block_range(10, 4, 2), (8, 2));
        assert!(
            glob("*.tmp", "x.tmp")
                && !glob("*.tmp", "a/x.tmp")
                && glob("model/?.bin", "model/a.bin")
        );
    }
}
