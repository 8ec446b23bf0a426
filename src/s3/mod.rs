//! A repository in an S3 bucket: `S3Backend`, a `repo::backend::Backend` over blocking HTTP.
//!
//! The repository's objects map one to one onto keys under `s3://BUCKET/PREFIX/`. Requests
//! are path-style by default (`ENDPOINT/BUCKET/KEY`, what Garage, MinIO and Ceph expect),
//! signed with SigV4 (`sigv4.rs`) over the SHA-256 of their body, which the server checks, so
//! an object that arrives damaged is refused rather than stored.
//!
//! `put_if_absent` does not rely on conditional writes (`If-None-Match: *`): Garage 2.5
//! answers 200 to it and overwrites. It asks with HEAD first and writes only when the key is
//! missing. Two writers that both find a key missing both write it, the second replacing the
//! first; that race is harmless here because every name the repository writes is either
//! random (packs, index objects: 128 random bits, one writer) or written once at `init`
//! (`config`), so two writers of one name only happen when two `vmref init` target one
//! prefix at the same moment.
//!
//! Failures that may pass (no connection, a timeout, a 5xx or 429 answer) are retried with
//! exponential backoff; anything else, and the last retry, is one `Error::ObjectStore` line
//! naming the repository, the request and the reason, never the credentials.

pub mod cache;
pub mod sigv4;

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::RwLock;
use sha2::{Digest, Sha256};

use crate::config::S3Config;
use crate::error::{Error, Result};
use crate::format::FormatError;
use crate::repo::backend::{Backend, check_name, missing};

/// How a repository location is written: `s3://BUCKET` or `s3://BUCKET/PREFIX`.
pub const SCHEME: &str = "s3://";
const DEFAULT_REGION: &str = "us-east-1";
/// Attempts per request; the waits between them double from `FIRST_BACKOFF` (3 s in all: a
/// server restart or a short network cut is ridden out, a dead server is reported within
/// seconds).
const ATTEMPTS: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// A listed key and its `LastModified`, as the server wrote it.
type Listed = (String, Option<String>);

/// The `[s3]` table of the config file, handed over once by the command line (a daemon
/// inherits it): the library opens stores without a config in hand.
static CONFIG: RwLock<Option<S3Config>> = RwLock::new(None);

/// Use `c` for every S3 repository this process opens from now on.
pub fn configure(c: &S3Config) {
    *CONFIG.write() = Some(c.clone());
}

/// The backend of the repository at `location` for the store at `store_root`: behind the
/// read cache under `STORE/cache/s3/` sized by `[s3] cache_size` (none when it is 0).
///
/// # Errors
/// As `S3Backend::open`; failure to make the cache directory.
pub fn open_cached(
    location: &str,
    store_root: &std::path::Path,
) -> Result<std::sync::Arc<dyn Backend>> {
    let s3 = S3Backend::open(location)?;
    // `VMREF_S3_CACHE_SIZE` wins over the config, as the AWS_* variables do for the rest.
    let size = env("VMREF_S3_CACHE_SIZE")
        .or_else(|| CONFIG.read().as_ref().and_then(|c| c.cache_size.clone()));
    let cap = size
        .map(|s| crate::config::parse_size(&s))
        .transpose()
        .map_err(|why| Error::BadArgument(format!("S3 cache size: {why}")))?
        .unwrap_or(cache::DEFAULT_CACHE_BYTES);
    if cap == 0 {
        return Ok(std::sync::Arc::new(s3));
    }
    Ok(std::sync::Arc::new(cache::CachedBackend::new(
        s3,
        &store_root.join(CACHE_DIR),
        cap,
    )?))
}

/// Where a store keeps its cache of S3 segments.
pub const CACHE_DIR: &str = "cache/s3";

/// Whether `location` names an S3 repository (else it is not a repository location at all).
pub fn is_location(location: &str) -> bool {
    location.starts_with(SCHEME)
}

/// Split `s3://BUCKET/PREFIX` into the bucket and the key prefix (empty, or ending in `/`).
///
/// # Errors
/// `BadArgument` naming what is wrong.
pub fn parse_location(location: &str) -> Result<(String, String)> {
    let bad = |why: &str| Error::BadArgument(format!("repository {location:?}: {why}"));
    let rest = location
        .strip_prefix(SCHEME)
        .ok_or_else(|| bad("a repository location is s3://BUCKET[/PREFIX]"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let ok_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
        && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !ok_bucket {
        return Err(bad(
            "a bucket name has 3 to 63 lowercase letters, digits, '-' and '.'",
        ));
    }
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return Ok((bucket.into(), String::new()));
    }
    // The prefix obeys the object name rules, so a key never escapes or aliases another.
    check_name(prefix).map_err(|e| bad(&e.to_string()))?;
    Ok((bucket.into(), format!("{prefix}/")))
}

/// Everything needed to reach a repository's bucket, resolved from the environment and the
/// config (`resolve`), or given outright (tests).
#[derive(Clone)]
pub struct S3Settings {
    /// `http(s)://host[:port]`.
    pub endpoint: String,
    pub region: String,
    pub path_style: bool,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for S3Settings {
    // Never the secret, wherever a settings value ends up printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

impl S3Settings {
    /// The environment first (`AWS_ENDPOINT_URL`, `AWS_REGION` or `AWS_DEFAULT_REGION`,
    /// `AWS_ACCESS_KEY_ID` with `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`), then `cfg`,
    /// then the defaults (AWS's endpoint for the region, "us-east-1", path-style).
    ///
    /// # Errors
    /// No credentials anywhere; an unreadable credentials file.
    pub fn resolve(cfg: &S3Config) -> std::result::Result<S3Settings, String> {
        let region = env("AWS_REGION")
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .or(cfg.region.clone())
            .unwrap_or_else(|| DEFAULT_REGION.into());
        let endpoint = env("AWS_ENDPOINT_URL")
            .or(cfg.endpoint.clone())
            .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        let (access_key_id, secret_access_key, session_token) =
            match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
                (Some(a), Some(s)) => (a, s, env("AWS_SESSION_TOKEN")),
                _ => match &cfg.credentials_file {
                    Some(p) => read_credentials(p)?,
                    None => {
                        return Err("no credentials: set AWS_ACCESS_KEY_ID and \
                                    AWS_SECRET_ACCESS_KEY, or credentials_file in the config's \
                                    [s3] table"
                            .into());
                    }
                },
            };
        Ok(S3Settings {
            endpoint,
            region,
            path_style: cfg.path_style.unwrap_or(true),
            access_key_id,
            secret_access_key,
            session_token,
        })
    }
}

/// Where requests go: `scheme://host[:port]`, from `AWS_ENDPOINT_URL` or `[s3] endpoint`.
struct Endpoint {
    scheme: &'static str,
    /// `host[:port]` as sent in the Host header (the port only when not the scheme's default).
    host: String,
}

fn parse_endpoint(url: &str) -> std::result::Result<Endpoint, String> {
    let (scheme, rest) = if let Some(r) = url.strip_prefix("https://") {
        ("https", r)
    } else if let Some(r) = url.strip_prefix("http://") {
        ("http", r)
    } else {
        return Err(format!("endpoint {url:?}: not an http:// or https:// URL"));
    };
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains(['/', '?', '#', '@', ' ']) {
        return Err(format!(
            "endpoint {url:?}: want scheme://host[:port] with no path or user"
        ));
    }
    let host = match (scheme, host.rsplit_once(':')) {
        ("http", Some((h, "80"))) | ("https", Some((h, "443"))) if !h.ends_with(':') => h,
        _ => host,
    };
    if scheme == "http" && !is_loopback(host) {
        return Err(format!(
            "endpoint {url:?}: plain http is allowed only for a loopback address; use https"
        ));
    }
    Ok(Endpoint {
        scheme,
        host: host.to_string(),
    })
}

fn is_loopback(host_port: &str) -> bool {
    let host = if let Some(r) = host_port.strip_prefix('[') {
        r.split_once(']').map_or(r, |(h, _)| h)
    } else {
        host_port.rsplit_once(':').map_or(host_port, |(h, _)| h)
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The credentials file: TOML with `access_key_id` and `secret_access_key` (and optionally
/// `session_token`), readable by its owner only.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
}

fn read_credentials(
    path: &std::path::Path,
) -> std::result::Result<(String, String, Option<String>), String> {
    use std::os::unix::fs::MetadataExt;
    let shown = path.display();
    let m = std::fs::metadata(path).map_err(|e| format!("credentials file {shown}: {e}"))?;
    if m.mode() & 0o077 != 0 {
        return Err(format!(
            "credentials file {shown} is readable by other users; chmod 600 it"
        ));
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("credentials file {shown}: {e}"))?;
    // The parser's message may quote the line, which may hold the secret: say only where.
    let c: CredentialsFile = toml::from_str(&text).map_err(|e| {
        format!(
            "credentials file {shown}: not TOML with access_key_id and secret_access_key{}",
            e.span()
                .map(|s| format!(" (at byte {})", s.start))
                .unwrap_or_default()
        )
    })?;
    Ok((c.access_key_id, c.secret_access_key, c.session_token))
}

/// Objects under `s3://BUCKET/PREFIX/`.
pub struct S3Backend {
    agent: ureq::Agent,
    endpoint: Endpoint,
    bucket: String,
    prefix: String,
    path_style: bool,
    region: String,
    creds: S3Settings,
    location: String,
    tmp_seq: AtomicU64,
}

/// What came back from one request.
struct Reply {
    status: u16,
    body: Vec<u8>,
    content_length: Option<u64>,
    /// The server's clock (`Date`), for the age of objects it lists.
    date: Option<String>,
}

/// A request's body.
enum Body<'a> {
    Empty,
    Bytes(&'a [u8]),
    /// A spooled file and its SHA-256.
    File(&'a mut File, String),
}

impl S3Backend {
    /// A backend for `location` (`s3://BUCKET[/PREFIX]`) with the settings `S3Settings::resolve`
    /// finds (the config's `[s3]` table is the one `configure` was given). Nothing is sent yet.
    ///
    /// # Errors
    /// `BadArgument` for a bad location; `ObjectStore` for a bad endpoint or no credentials.
    pub fn open(location: &str) -> Result<S3Backend> {
        parse_location(location)?;
        let cfg = CONFIG.read().clone().unwrap_or_default();
        let settings = S3Settings::resolve(&cfg)
            .map_err(|why| Error::ObjectStore(format!("{location}: {why}")))?;
        S3Backend::new(location, settings)
    }

    /// A backend for `location` with `settings` as given.
    ///
    /// # Errors
    /// As `open`.
    pub fn new(location: &str, settings: S3Settings) -> Result<S3Backend> {
        let (bucket, prefix) = parse_location(location)?;
        let endpoint = parse_endpoint(&settings.endpoint)
            .map_err(|why| Error::ObjectStore(format!("{location}: {why}")))?;
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            // Progress timeouts, not totals: a 16 MiB pack on a slow link may take minutes.
            .timeout_per_read(Some(Duration::from_secs(60)))
            .timeout_per_write(Some(Duration::from_secs(60)))
            .build()
            .new_agent();
        Ok(S3Backend {
            agent,
            endpoint,
            bucket,
            prefix,
            path_style: settings.path_style,
            region: settings.region.clone(),
            creds: settings,
            location: location.trim_end_matches('/').to_string(),
            tmp_seq: AtomicU64::new(0),
        })
    }

    fn fail(&self, method: &str, name: &str, why: impl std::fmt::Display) -> Error {
        Error::ObjectStore(format!(
            "{} ({}://{}): {method} {name}: {why}",
            self.location, self.endpoint.scheme, self.endpoint.host
        ))
    }

    /// Host and encoded path of `key` (None: the bucket itself, for listings).
    fn target(&self, key: Option<&str>) -> (String, String) {
        let key = key.map(|k| sigv4::uri_encode(k, true));
        if self.path_style {
            let path = match key {
                Some(k) => format!("/{}/{k}", self.bucket),
                None => format!("/{}", self.bucket),
            };
            (self.endpoint.host.clone(), path)
        } else {
            let host = format!("{}.{}", self.bucket, self.endpoint.host);
            (host, format!("/{}", key.unwrap_or_default()))
        }
    }

    /// One request, retried while it fails in a way that may pass. `Err` is the reason of the
    /// last attempt.
    fn request(
        &self,
        method: &str,
        key: Option<&str>,
        query: &[(&str, &str)],
        range: Option<String>,
        mut body: Body<'_>,
    ) -> std::result::Result<Reply, String> {
        let mut wait = FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            let r = self.attempt(method, key, query, range.as_deref(), &mut body);
            let retry = match &r {
                Ok(rep) => rep.status >= 500 || rep.status == 429,
                Err(_) => true,
            };
            if !retry || attempt == ATTEMPTS {
                return match r {
                    Err(why) if attempt > 1 => Err(format!("{why} ({attempt} attempts)")),
                    r => r,
                };
            }
            log::debug!("{method} {key:?}: attempt {attempt} failed, retrying");
            std::thread::sleep(wait);
            wait *= 2;
            attempt += 1;
        }
    }

    fn attempt(
        &self,
        method: &str,
        key: Option<&str>,
        query: &[(&str, &str)],
        range: Option<&str>,
        body: &mut Body<'_>,
    ) -> std::result::Result<Reply, String> {
        let (host, path) = self.target(key);
        let payload = match body {
            Body::Empty => sigv4::EMPTY_SHA256.to_string(),
            Body::Bytes(b) => sigv4::sha256_hex(b),
            Body::File(_, sha) => sha.clone(),
        };
        let amz_date = jiff::Timestamp::now()
            .strftime("%Y%m%dT%H%M%SZ")
            .to_string();
        let mut headers: Vec<(&str, &str)> = vec![
            ("host", &host),
            ("x-amz-content-sha256", &payload),
            ("x-amz-date", &amz_date),
        ];
        if let Some(r) = range {
            headers.push(("range", r));
        }
        if let Some(t) = &self.creds.session_token {
            headers.push(("x-amz-security-token", t));
        }
        let auth = sigv4::authorization(
            &sigv4::Request {
                method,
                path: &path,
                query,
                headers: &headers,
                payload_sha256: &payload,
            },
            &sigv4::Key {
                access_key_id: &self.creds.access_key_id,
                secret_access_key: &self.creds.secret_access_key,
                region: &self.region,
                service: "s3",
            },
            &amz_date,
        );
        let q = sigv4::canonical_query(query);
        let url = format!(
            "{}://{host}{path}{}{q}",
            self.endpoint.scheme,
            if q.is_empty() { "" } else { "?" }
        );
        let mut req = ureq::http::Request::builder().method(method).uri(&url);
        for (k, v) in &headers {
            // ureq writes the Host header itself, from the URL (the same value).
            if *k != "host" {
                req = req.header(*k, *v);
            }
        }
        req = req.header("authorization", auth);
        let sent = match body {
            Body::Empty => self.agent.run(req.body(()).map_err(|e| e.to_string())?),
            Body::Bytes(b) => self.agent.run(req.body(*b).map_err(|e| e.to_string())?),
            Body::File(f, _) => {
                // Sent from the start at every attempt; ureq sends the file's length.
                f.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
                self.agent.run(req.body(&**f).map_err(|e| e.to_string())?)
            }
        };
        let mut resp = sent.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let content_length = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let date = resp
            .headers()
            .get("date")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = if method == "HEAD" {
            Vec::new()
        } else {
            resp.body_mut()
                .with_config()
                .limit(u64::MAX)
                .read_to_vec()
                .map_err(|e| e.to_string())?
        };
        Ok(Reply {
            status,
            body,
            content_length,
            date,
        })
    }

    fn key(&self, name: &str) -> Result<String> {
        check_name(name)?;
        Ok(format!("{}{name}", self.prefix))
    }

    /// A reply that is not what the request wanted, as an error.
    fn unexpected(&self, method: &str, name: &str, rep: &Reply) -> Error {
        let text = String::from_utf8_lossy(&rep.body);
        let code = xml_values(&text, "Code").into_iter().next();
        let msg = xml_values(&text, "Message").into_iter().next();
        let why = match (rep.status, code, msg) {
            (_, Some(c), Some(m)) => format!("HTTP {} {c}: {m}", rep.status),
            (_, Some(c), None) => format!("HTTP {} {c}", rep.status),
            (403, None, _) => "HTTP 403: access denied (check the credentials)".into(),
            (404, None, _) => "HTTP 404: no such bucket or object".into(),
            (s, None, _) => format!("HTTP {s}"),
        };
        self.fail(method, name, why)
    }

    fn truncated(&self, name: &str, got: u64, need: u64) -> Error {
        Error::Format {
            path: format!("repository object {name}").into(),
            source: FormatError::Truncated {
                got: got as usize,
                need: need as usize,
            },
        }
    }

    /// Upload `body` to `name` unless it exists (see the module's note on the race).
    fn put_body(&self, name: &str, body: Body<'_>) -> Result<bool> {
        let key = self.key(name)?;
        if self.exists(name, &key)? {
            return Ok(false);
        }
        let rep = self
            .request("PUT", Some(&key), &[], None, body)
            .map_err(|why| self.fail("PUT", name, why))?;
        match rep.status {
            200 | 201 | 204 => Ok(true),
            _ => Err(self.unexpected("PUT", name, &rep)),
        }
    }

    fn exists(&self, name: &str, key: &str) -> Result<bool> {
        match self.head(name, key) {
            Ok(_) => Ok(true),
            Err(e) if crate::repo::backend::is_missing(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn head(&self, name: &str, key: &str) -> Result<u64> {
        let rep = self
            .request("HEAD", Some(key), &[], None, Body::Empty)
            .map_err(|why| self.fail("HEAD", name, why))?;
        match rep.status {
            200 => rep
                .content_length
                .ok_or_else(|| self.fail("HEAD", name, "no Content-Length in the reply")),
            404 => Err(missing(name)),
            _ => Err(self.unexpected("HEAD", name, &rep)),
        }
    }

    /// Every key under `prefix` (sorted, the prefix of the repository taken off) with its
    /// `LastModified`, and the server's `Date` of the last page.
    fn list_entries(&self, prefix: &str) -> Result<(Vec<Listed>, Option<String>)> {
        let full = format!("{}{prefix}", self.prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        let mut date;
        loop {
            let mut q = vec![("list-type", "2"), ("prefix", full.as_str())];
            if let Some(t) = &token {
                q.push(("continuation-token", t));
            }
            let rep = self
                .request("GET", None, &q, None, Body::Empty)
                .map_err(|why| self.fail("LIST", prefix, why))?;
            if rep.status != 200 {
                return Err(self.unexpected("LIST", prefix, &rep));
            }
            date = rep.date.clone();
            let text = String::from_utf8_lossy(&rep.body);
            for c in xml_values(&text, "Contents") {
                let Some(k) = xml_values(&c, "Key").into_iter().next() else {
                    continue;
                };
                if let Some(n) = k.strip_prefix(&self.prefix) {
                    let modified = xml_values(&c, "LastModified").into_iter().next();
                    out.push((n.to_string(), modified));
                }
            }
            let more = xml_values(&text, "IsTruncated").first().map(String::as_str) == Some("true");
            token = xml_values(&text, "NextContinuationToken")
                .into_iter()
                .next();
            if !more {
                break;
            }
            if token.is_none() {
                return Err(self.fail(
                    "LIST",
                    prefix,
                    "truncated listing without a continuation token",
                ));
            }
        }
        out.sort();
        Ok((out, date))
    }

    /// An unlinked file in the temp directory, for objects too large to hold in memory.
    fn spool(&self) -> Result<File> {
        let p = std::env::temp_dir().join(format!(
            ".vmref-s3.{}.{}",
            std::process::id(),
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        ));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
            .map_err(Error::io("create", &p))?;
        let _ = std::fs::remove_file(&p);
        Ok(f)
    }
}

/// Writes through to a file and hashes what passes.
struct Hashing<W: Write> {
    inner: W,
    sha: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl S3Backend {
    /// Up to `len` bytes at `off`: fewer where the object ends, none when it ends at or
    /// before `off`. The cache fetches fixed segments with it without asking for the size.
    ///
    /// # Errors
    /// `missing(name)`; `ObjectStore` for a failed request.
    pub fn get_upto(&self, name: &str, off: u64, len: usize) -> Result<Vec<u8>> {
        let key = self.key(name)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let range = format!("bytes={off}-{}", off + len as u64 - 1);
        let rep = self
            .request("GET", Some(&key), &[], Some(range), Body::Empty)
            .map_err(|why| self.fail("GET", name, why))?;
        match rep.status {
            206 => {
                let mut b = rep.body;
                b.truncate(len);
                Ok(b)
            }
            200 => Ok(rep
                .body
                .get(off as usize..)
                .unwrap_or_default()
                .iter()
                .take(len)
                .copied()
                .collect()),
            416 => Ok(Vec::new()),
            404 => Err(missing(name)),
            _ => Err(self.unexpected("GET", name, &rep)),
        }
    }
}

impl Backend for S3Backend {
    fn get(&self, name: &str) -> Result<Vec<u8>> {
        let key = self.key(name)?;
        let rep = self
            .request("GET", Some(&key), &[], None, Body::Empty)
            .map_err(|why| self.fail("GET", name, why))?;
        match rep.status {
            200 => Ok(rep.body),
            404 => Err(missing(name)),
            _ => Err(self.unexpected("GET", name, &rep)),
        }
    }

    fn get_range(&self, name: &str, off: u64, len: usize) -> Result<Vec<u8>> {
        let key = self.key(name)?;
        let end = off.saturating_add(len as u64);
        if len == 0 {
            // A range of no bytes cannot be asked for; the object's size answers instead.
            let size = self.head(name, &key)?;
            return if off <= size {
                Ok(Vec::new())
            } else {
                Err(self.truncated(name, size, end))
            };
        }
        let range = format!("bytes={off}-{}", end - 1);
        let rep = self
            .request("GET", Some(&key), &[], Some(range), Body::Empty)
            .map_err(|why| self.fail("GET", name, why))?;
        match rep.status {
            206 | 200 => {
                // A server that ignored the range sends the whole object (200).
                let body = if rep.status == 200 {
                    rep.body.get(off as usize..).unwrap_or_default().to_vec()
                } else {
                    rep.body
                };
                if (body.len() as u64) < len as u64 {
                    return Err(self.truncated(name, off + body.len() as u64, end));
                }
                Ok(body[..len].to_vec())
            }
            416 => Err(self.truncated(name, self.head(name, &key)?, end)),
            404 => Err(missing(name)),
            _ => Err(self.unexpected("GET", name, &rep)),
        }
    }

    fn put_if_absent(&self, name: &str, bytes: &[u8]) -> Result<bool> {
        self.put_body(name, Body::Bytes(bytes))
    }

    fn put_stream(
        &self,
        name: &str,
        write: &mut dyn FnMut(&mut dyn Write) -> Result<()>,
    ) -> Result<bool> {
        let key = self.key(name)?;
        if self.exists(name, &key)? {
            return Ok(false);
        }
        // Spooled to a file: the signature needs the body's hash before the first byte is
        // sent, and a merged index or a compaction's pack may be large.
        let mut file = self.spool()?;
        let tmp = std::env::temp_dir();
        let mut h = Hashing {
            inner: BufWriter::with_capacity(
                1 << 20,
                file.try_clone()
                    .map_err(Error::io("dup a spool file in", &tmp))?,
            ),
            sha: Sha256::new(),
        };
        write(&mut h)?;
        h.flush()
            .map_err(Error::io("write a spool file in", &tmp))?;
        let Hashing { inner, sha } = h;
        drop(inner);
        let sha = sigv4::hex(&sha.finalize());
        self.put_body(name, Body::File(&mut file, sha))
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .list_entries(prefix)?
            .0
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    fn list_aged(&self, prefix: &str) -> Result<Vec<(String, std::time::Duration)>> {
        let (entries, date) = self.list_entries(prefix)?;
        // Without the server's clock nothing can be called old: every lock stays live.
        let now = date.as_deref().and_then(parse_http_date);
        Ok(entries
            .into_iter()
            .map(|(k, modified)| {
                let age = match (
                    now,
                    modified.and_then(|m| m.parse::<jiff::Timestamp>().ok()),
                ) {
                    (Some(now), Some(m)) => {
                        std::time::Duration::try_from(now.duration_since(m)).unwrap_or_default()
                    }
                    _ => std::time::Duration::ZERO,
                };
                (k, age)
            })
            .collect())
    }

    fn delete(&self, name: &str) -> Result<()> {
        let key = self.key(name)?;
        let rep = self
            .request("DELETE", Some(&key), &[], None, Body::Empty)
            .map_err(|why| self.fail("DELETE", name, why))?;
        match rep.status {
            200 | 204 | 404 => Ok(()),
            _ => Err(self.unexpected("DELETE", name, &rep)),
        }
    }

    fn size(&self, name: &str) -> Result<u64> {
        let key = self.key(name)?;
        self.head(name, &key)
    }

    fn describe(&self) -> String {
        self.location.clone()
    }
}

/// An HTTP date (`Wed, 02 Dec 2026 18:40:00 GMT`).
fn parse_http_date(s: &str) -> Option<jiff::Timestamp> {
    jiff::fmt::rfc2822::DateTimeParser::new()
        .parse_timestamp(s)
        .ok()
}

/// The text of every `<tag>...</tag>` in `xml`, entities decoded. S3 answers are flat enough
/// (a list of `<Contents><Key>`, an `<Error><Code>`) that this is all the XML they need.
fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(unescape(&after[..j]));
        rest = &after[j + close.len()..];
    }
    out
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        let Some(j) = after.find(';') else {
            out.push_str(after);
            return out;
        };
        let ent = &after[1..j];
        let c = match ent {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => ent
                .strip_prefix("#x")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| ent.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match c {
            Some(c) => out.push(c),
            None => out.push_str(&after[..=j]),
        }
        rest = &after[j + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        assert_eq!(
            parse_location("s3://vm-backups/host1/vm1/").unwrap(),
            ("vm-backups".into(), "host1/vm1/".into())
        );
        assert_eq!(
            parse_location("s3://vmref").unwrap(),
            ("vmref".into(), String::new())
        );
        for bad in [
            "vmref",
            "s3://",
            "s3://ab",
            "s3://Upper",
            "s3://-x-/p",
            "s3://bucket/../x",
            "s3://bucket/a//b",
            "s3://bucket/.hidden",
            "s3://bucket/a b",
        ] {
            assert!(parse_location(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn endpoints() {
        let e = parse_endpoint("http://127.0.0.1:3900/").unwrap();
        assert_eq!((e.scheme, e.host.as_str()), ("http", "127.0.0.1:3900"));
        let e = parse_endpoint("https://s3.example.com:443").unwrap();
        assert_eq!(e.host, "s3.example.com");
        assert!(parse_endpoint("http://[::1]:9000").is_ok());
        assert!(parse_endpoint("http://localhost").is_ok());
        for bad in [
            "http://s3.example.com",
            "http://10.0.0.1:3900",
            "ftp://x",
            "https://user:pw@host",
            "https://host/path",
            "https://",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn xml() {
        let x = "<ListBucketResult><IsTruncated>false</IsTruncated>\
                 <Contents><Key>p/a&amp;b</Key></Contents><Contents><Key>p/c&#x2F;d</Key>\
                 </Contents></ListBucketResult>";
        assert_eq!(xml_values(x, "Key"), vec!["p/a&b", "p/c/d"]);
        assert_eq!(xml_values(x, "IsTruncated"), vec!["false"]);
        assert_eq!(unescape("a&bogus;&lt;"), "a&bogus;<");
    }

    #[test]
    fn server_dates() {
        let d = parse_http_date("Wed, 02 Dec 2026 18:40:00 GMT").unwrap();
        let m: jiff::Timestamp = "2026-12-02T18:10:00.000Z".parse().unwrap();
        assert_eq!(d.duration_since(m).as_secs(), 1800);
        assert!(parse_http_date("yesterday").is_none());
    }
}
