//! Helpers shared by the backup tests: a temp store with one disk, the CLI, writes through the
//! library (a write to the image behind vmref's back would be detected as an outside write),
//! and a model of the disk's bytes at every point.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vmref::engine::Engine;
use vmref::store::Store;

pub const BS: usize = 4096;

/// Deterministic xorshift, so a failure can be replayed from its seed.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub store: PathBuf,
    pub image: PathBuf,
    /// What the live disk holds now.
    pub model: Vec<u8>,
    /// Environment of every `vmref` this runs (an object store's endpoint and key).
    pub envs: Vec<(String, String)>,
    /// The `[s3]` settings the in-process engine of `write` reaches the repository with.
    pub s3: Option<vmref::config::S3Config>,
}

/// The S3 settings are per process (`vmref::s3::configure`): in-process engines of tests
/// with different servers take turns.
static S3_CONFIG: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Env {
    /// A store with block size 4K and one disk `disk0` of `size` bytes, with `data` written at
    /// offset 0 before it is registered (that is not an outside write: tracking starts after).
    pub fn new(size: usize, data: &[u8]) -> Env {
        Env::with_init(size, data, &[], Vec::new(), None)
    }

    /// `new` with more `init` arguments (a `--block-size` among them replaces 4K), an
    /// environment for every command and the S3 settings for in-process engines.
    pub fn with_init(
        size: usize,
        data: &[u8],
        init: &[&str],
        envs: Vec<(String, String)>,
        s3: Option<vmref::config::S3Config>,
    ) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let image = dir.path().join("disk0.img");
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(size as u64).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, data, 0).unwrap();
        drop(f);
        let mut model = vec![0u8; size];
        model[..data.len()].copy_from_slice(data);
        let e = Env {
            dir,
            store,
            image,
            model,
            envs,
            s3,
        };
        let bs: &[&str] = if init.contains(&"--block-size") {
            &[]
        } else {
            &["--block-size", "4K"]
        };
        e.ok(&[&["init"], bs, init].concat());
        e.ok(&["disk", "add", "disk0", e.image.to_str().unwrap()]);
        e
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vmref"));
        c.arg("--store").arg(&self.store).args(args);
        c.env_remove("VMREF_STORE");
        c.envs(self.envs.iter().map(|(k, v)| (k, v)));
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Run and insist on success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "vmref {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// Run and insist on failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(!o.status.success(), "vmref {args:?} should fail");
        String::from_utf8(o.stderr).unwrap()
    }

    /// Write through the library, as the mount would, and update the model.
    pub fn write(&mut self, writes: &[(u64, Vec<u8>)]) {
        let _turn = self.s3.as_ref().map(|c| {
            let g = S3_CONFIG.lock().unwrap_or_else(|e| e.into_inner());
            vmref::s3::configure(c);
            g
        });
        let engine = Engine::open(Store::open(&self.store).unwrap()).unwrap();
        let d = engine.disk("disk0").unwrap();
        for (off, data) in writes {
            d.write_at(data, *off).unwrap();
            self.model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
        engine.close().unwrap();
    }

    /// A few random writes: random data, random zeros, some unaligned.
    pub fn random_writes(&mut self, rng: &mut Rng, n: usize) {
        let size = self.model.len() as u64;
        let mut w = Vec::new();
        for _ in 0..n {
            let len = 1 + rng.below(3 * BS as u64) as usize;
            let off = rng.below(size - len as u64);
            let mut data = vec![0u8; len];
            if rng.below(5) != 0 {
                rng.fill(&mut data);
            }
            w.push((off, data));
        }
        self.write(&w);
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `vmref restore POINT --disk disk0 --to <temp file> --force`, and that file.
    fn restore_run(&self, point: &str) -> (Output, PathBuf) {
        let to = self.path(&format!("restore-{point}.img"));
        let args = ["restore", point, "--disk", "disk0", "--to"];
        let o = self.run(&[&args[..], &[to.to_str().unwrap(), "--force"]].concat());
        (o, to)
    }

    /// Restore `point` and return its bytes.
    pub fn restore(&self, point: &str) -> Vec<u8> {
        let (o, to) = self.restore_run(point);
        assert!(
            o.status.success(),
            "restore {point}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let b = std::fs::read(&to).unwrap();
        std::fs::remove_file(&to).unwrap();
        b
    }

    /// Names of restorable points, oldest first.
    pub fn restorable(&self) -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["ref", "list", "--json"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["state"] == "restorable")
            .map(|r| r["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// Run `vmref verify ARGS...`, insist that it fails saying it found damage; returns its
    /// stdout (the damage, one line each).
    pub fn verify_fails(&self, args: &[&str]) -> String {
        let o = self.run(&[&["verify"], args].concat());
        assert!(!o.status.success(), "verify {args:?} found no damage");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("damaged"), "verify {args:?}: {err}");
        String::from_utf8(o.stdout).unwrap()
    }

    /// Restore `point` and insist that it fails without leaving a file; returns stderr.
    pub fn restore_fails(&self, point: &str) -> String {
        let (o, to) = self.restore_run(point);
        assert!(!o.status.success(), "restore {point} should fail");
        assert!(!to.exists(), "{point}: no half-restored file");
        String::from_utf8(o.stderr).unwrap()
    }

    /// What `vmref status --json` says of the repository's space.
    pub fn space(&self) -> vmref::backup::data::Space {
        super::status_space(&self.ok(&["status", "--json"]))
    }

    /// The repository's pack and index objects.
    pub fn repo_objects(&self) -> Vec<PathBuf> {
        let mut v = super::repo_packs(&self.store);
        v.extend(super::repo_indexes(&self.store));
        v
    }
}

/// Assert two images are equal, naming the first differing block.
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: size");
    if got != want {
        let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
        panic!("{what}: first difference at byte {i} (block {})", i / BS);
    }
}

pub fn file_allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}
