//! A Garage S3 server for the tests: single node, on free loopback ports, its data and
//! metadata in a temp dir, one bucket and key made at start (`--single-node
//! --default-bucket`). The guard kills it by pid when dropped; `restart` brings it back on the
//! same data and ports.
//!
//! Without a `garage` binary (on PATH or in ~/.cargo/bin) `Garage::start` prints
//! `SKIP: <test>: garage missing` and returns None, unless `VMREF_REQUIRE_S3=1`, where it
//! fails the test instead (CI installs garage).
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmref::config::S3Config;
use vmref::repo::backend::Backend;
use vmref::s3::{S3Backend, S3Settings};

pub const ACCESS_KEY: &str = "GK0123456789abcdef01234567";
pub const SECRET_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
pub const BUCKET: &str = "vmref-test";
pub const REGION: &str = "garage";

pub struct Garage {
    dir: tempfile::TempDir,
    bin: PathBuf,
    child: Option<Child>,
    pub s3_port: u16,
}

fn find_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let home = std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/bin"));
    std::env::split_paths(&path)
        .chain(home)
        .map(|d| d.join("garage"))
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Garage {
    /// A running server, or None (after printing the skip line) when garage is missing.
    pub fn start(test: &str) -> Option<Garage> {
        let Some(bin) = find_binary() else {
            if std::env::var("VMREF_REQUIRE_S3").as_deref() == Ok("1") {
                panic!("{test}: garage missing and VMREF_REQUIRE_S3=1");
            }
            // Straight to stderr: the harness keeps what a passing test prints with eprintln!.
            let line =
                format!("SKIP: {test}: garage missing (set VMREF_REQUIRE_S3=1 to fail instead)\n");
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let (s3_port, rpc_port) = (free_port(), free_port());
        let root = dir.path();
        std::fs::write(
            root.join("garage.toml"),
            format!(
                "metadata_dir = \"{meta}\"\n\
                 data_dir = \"{data}\"\n\
                 db_engine = \"sqlite\"\n\
                 replication_factor = 1\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc_port}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc_port}\"\n\
                 rpc_secret = \"{secret}\"\n\
                 [s3_api]\n\
                 s3_region = \"{REGION}\"\n\
                 api_bind_addr = \"127.0.0.1:{s3_port}\"\n",
                meta = root.join("meta").display(),
                data = root.join("data").display(),
                secret = "ab".repeat(32),
            ),
        )
        .unwrap();
        let mut g = Garage {
            dir,
            bin,
            child: None,
            s3_port,
        };
        g.restart();
        Some(g)
    }

    /// Where the server keeps object data.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    pub fn settings(&self) -> S3Settings {
        S3Settings {
            endpoint: self.endpoint(),
            region: REGION.into(),
            path_style: true,
            access_key_id: ACCESS_KEY.into(),
            secret_access_key: SECRET_KEY.into(),
            session_token: None,
        }
    }

    /// The environment a `vmref` process needs to reach the server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_REGION", REGION.into()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The `[s3]` settings of a config file naming the server, with a credentials file beside
    /// it: for code that runs in the test process (whose environment every test shares) and
    /// for `--config`.
    pub fn s3_config(&self) -> S3Config {
        let creds = self.dir.path().join("credentials.toml");
        std::fs::write(
            &creds,
            format!("access_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\n"),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
        S3Config {
            endpoint: Some(self.endpoint()),
            region: Some(REGION.into()),
            path_style: Some(true),
            credentials_file: Some(creds),
            cache_size: None,
        }
    }

    /// A config file with `s3_config` as its `[s3]` table.
    pub fn config_file(&self) -> PathBuf {
        let c = self.s3_config();
        let cfg = self.dir.path().join("vmref.toml");
        std::fs::write(
            &cfg,
            format!(
                "[s3]\nendpoint = \"{}\"\nregion = \"{REGION}\"\npath_style = true\n\
                 credentials_file = \"{}\"\n",
                self.endpoint(),
                c.credentials_file.unwrap().display()
            ),
        )
        .unwrap();
        cfg
    }

    /// A backend on `s3://BUCKET/prefix`.
    pub fn backend(&self, prefix: &str) -> S3Backend {
        S3Backend::new(&format!("s3://{BUCKET}/{prefix}"), self.settings()).unwrap()
    }

    /// Start the server (again) on the same data and ports, and wait until the bucket answers.
    pub fn restart(&mut self) {
        self.kill();
        let log = std::fs::File::create(self.dir.path().join("garage.log")).unwrap();
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(self.dir.path().join("garage.toml"))
            .args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_DEFAULT_ACCESS_KEY", ACCESS_KEY)
            .env("GARAGE_DEFAULT_SECRET_KEY", SECRET_KEY)
            .env("GARAGE_DEFAULT_BUCKET", BUCKET)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        let probe = self.backend("probe");
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("garage exited ({st}) at start:\n{}", self.log());
            }
            let up =
                TcpStream::connect(("127.0.0.1", self.s3_port)).is_ok() && probe.list("").is_ok();
            if up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "garage did not answer within 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kill the server (SIGKILL, by pid) and reap it; a no-op when it is not running.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("garage.log")).unwrap_or_default()
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.kill();
    }
}
