//! The local registry: versions, dedupe, aliases, deletes, exports and concurrent registration.

use std::path::{Path, PathBuf};

use ferrotune_registry::{RegisterRequest, Registry, VersionSpec};

/// A folder that looks like an export: MLmodel with a lineage and some weights.
fn export_like(dir: &Path, weights: &[u8]) -> PathBuf {
    std::fs::create_dir_all(dir.join("model")).unwrap();
    std::fs::write(
        dir.join("MLmodel"),
        "flavors:\n  transformers:\n    task: text-generation\nmetadata:\n  task: llm/v1/chat\n  ferrotune:\n    base_model: microsoft/Phi-3-mini-4k-instruct\n    step: 180\n    data_cache_key: abc\n",
    )
    .unwrap();
    std::fs::write(dir.join("model/model.safetensors"), weights).unwrap();
    dir.to_path_buf()
}

fn request(path: &Path) -> RegisterRequest {
    RegisterRequest {
        path: path.to_path_buf(),
        ..Default::default()
    }
}

fn spec(s: &str) -> VersionSpec {
    VersionSpec::parse(s).unwrap()
}

fn stored_folders(home: &Path) -> usize {
    std::fs::read_dir(home.join("artifacts")).unwrap().count()
}

#[test]
fn versions_default_to_the_time_and_the_same_folder_is_stored_once() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let folder = export_like(&tmp.path().join("export"), b"weights-1");
    let mut reg = Registry::open(&home).unwrap();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let first = reg.register(&request(&folder)).unwrap();
    assert_eq!(first.name, "Phi-3-mini-4k-instruct-ultrachat-200k");
    assert!(first.version >= before && first.version <= before + 5);
    assert_eq!(first.kind, "mlflow");
    assert_eq!(first.lineage.as_ref().unwrap()["step"], 180);
    let second = reg.register(&request(&folder)).unwrap();
    assert!(
        second.version > first.version,
        "distinct versions in one second"
    );
    assert_eq!(second.artifact, first.artifact);
    assert_eq!(stored_folders(&home), 1, "stored once");
    assert_eq!(
        std::fs::read(first.path.join("model/model.safetensors")).unwrap(),
        b"weights-1"
    );

    let mut r = request(&folder);
    r.name = Some("mine".into());
    r.version = Some(3);
    r.description = "first try".into();
    r.tags = vec![("team".into(), "nlp".into())];
    let v = reg.register(&r).unwrap();
    assert_eq!((v.version, v.description.as_str()), (3, "first try"));
    assert_eq!(v.tags["team"], "nlp");
    let err = reg.register(&r).unwrap_err();
    assert!(
        err.is_usage() && err.to_string().contains("already registered"),
        "{err}"
    );

    assert_eq!(reg.get(&spec("mine")).unwrap().version, 3);
    assert_eq!(reg.get(&spec("mine:3")).unwrap().version, 3);
    let list = reg.list().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].versions, 2);
    assert!(reg.get(&spec("nothing")).unwrap_err().is_usage());
    let err = reg
        .register(&request(&tmp.path().join("missing")))
        .unwrap_err();
    assert!(err.to_string().contains("no such folder"), "{err}");
}

#[test]
fn aliases_move_and_deleted_versions_lose_their_files_only_when_unshared() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let a = export_like(&tmp.path().join("a"), b"A");
    let b = export_like(&tmp.path().join("b"), b"B");
    let mut reg = Registry::open(&home).unwrap();
    let named = |p: &Path, v: u64| RegisterRequest {
        path: p.to_path_buf(),
        name: Some("m".into()),
        version: Some(v),
        ..Default::default()
    };
    reg.register(&named(&a, 1)).unwrap();
    reg.register(&named(&a, 2)).unwrap();
    let v3 = reg.register(&named(&b, 3)).unwrap();
    reg.set_alias("m", "prod", 1).unwrap();
    reg.set_alias("m", "prod", 3).unwrap();
    assert_eq!(reg.get(&spec("m@prod")).unwrap().version, 3);
    assert_eq!(reg.get(&spec("m:3")).unwrap().aliases, ["prod"]);
    assert!(reg.set_alias("m", "42", 1).unwrap_err().is_usage());
    assert!(reg.set_alias("m", "x", 9).unwrap_err().is_usage());

    // 1 and 2 share a folder: deleting 1 keeps it, deleting 2 removes it.
    let v1 = reg.delete_version("m", 1).unwrap();
    assert!(v1.path.is_dir());
    reg.delete_version("m", 2).unwrap();
    assert!(!v1.path.exists());
    assert_eq!(stored_folders(&home), 1);

    // Export copies the folder out, atomically, never over an existing one without force.
    let out = tmp.path().join("out");
    reg.export(&spec("m@prod"), &out, false).unwrap();
    assert_eq!(
        std::fs::read(out.join("model/model.safetensors")).unwrap(),
        b"B"
    );
    assert!(reg.export(&spec("m@prod"), &out, false).is_err());

    reg.delete_version("m", 3).unwrap();
    assert!(!v3.path.exists());
    assert!(
        reg.get(&spec("m@prod")).unwrap_err().is_usage(),
        "alias went with it"
    );
    assert_eq!(reg.list().unwrap()[0].versions, 0);
    reg.delete_model("m").unwrap();
    assert!(reg.list().unwrap().is_empty());
}

#[test]
fn concurrent_registrations_get_distinct_versions_and_all_survive() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    Registry::open(&home).unwrap();
    let folders: Vec<PathBuf> = (0..6)
        .map(|i| {
            export_like(
                &tmp.path().join(format!("e{i}")),
                format!("w{}", i % 3).as_bytes(),
            )
        })
        .collect();
    let handles: Vec<_> = folders
        .into_iter()
        .map(|f| {
            let home = home.clone();
            std::thread::spawn(move || {
                let mut reg = Registry::open(&home).unwrap();
                let mut r = request(&f);
                r.name = Some("race".into());
                reg.register(&r).unwrap().version
            })
        })
        .collect();
    let mut versions: Vec<u64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    versions.sort();
    versions.dedup();
    assert_eq!(versions.len(), 6, "{versions:?}");
    let reg = Registry::open(&home).unwrap();
    assert_eq!(reg.versions("race").unwrap().len(), 6);
    for v in reg.versions("race").unwrap() {
        assert!(v.path.join("MLmodel").is_file());
    }
    // Three distinct contents, nothing half-copied left behind.
    assert_eq!(stored_folders(&home), 3);
}

#[test]
fn a_crash_mid_copy_leaves_no_version_and_does_not_block_the_next_one() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let folder = export_like(&tmp.path().join("export"), b"W");
    {
        Registry::open(&home).unwrap();
    }
    // What a killed copy leaves: a hidden partial folder; a kill between storing the folder
    // and committing its version leaves an unreferenced one, removed on the next open.
    std::fs::create_dir_all(home.join("artifacts/.incoming-999-0/model")).unwrap();
    std::fs::create_dir_all(home.join("artifacts/0123abcd/model")).unwrap();
    let mut reg = Registry::open(&home).unwrap();
    assert!(reg.list().unwrap().is_empty());
    assert!(!home.join("artifacts/0123abcd").exists());
    let v = reg.register(&request(&folder)).unwrap();
    assert!(v.path.join("model/model.safetensors").is_file());
}

#[test]
fn a_delete_killed_before_its_commit_is_undone_on_the_next_open() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let folder = export_like(&tmp.path().join("export"), b"W");
    let v = Registry::open(&home)
        .unwrap()
        .register(&request(&folder))
        .unwrap();
    // A delete moves the folder aside inside its transaction; killed there, the row remains.
    let aside = home.join(format!("artifacts/.deleted-{}-999-0", v.artifact));
    std::fs::rename(&v.path, &aside).unwrap();
    let reg = Registry::open(&home).unwrap();
    let again = reg.get(&spec(&v.name)).unwrap();
    assert!(again.path.join("model/model.safetensors").is_file());
    assert!(!aside.exists());
}
