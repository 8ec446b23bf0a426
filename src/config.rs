//! The config file (TOML). Every key is optional; `config.example.toml` documents each one
//! with its default. Found by `--config FILE`, else `/etc/vmref/config.toml` when present.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::format::FormatError;

pub const SYSTEM_CONFIG: &str = "/etc/vmref/config.toml";
pub const DEFAULT_STORE: &str = "/var/lib/vmref";

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The store directory.
    pub store: Option<PathBuf>,
    /// Block size `vmref init` uses when `--block-size` is not given.
    pub block_size: Option<String>,
    /// Compression `vmref init` gives the store's repository when `--compression` is not
    /// given: "none", "zstd" or "zstd:LEVEL".
    pub compression: Option<String>,
    /// Seconds between lazy flushes of tracking state while mounted.
    pub flush_interval_secs: Option<u64>,
    /// Mount with allow_other even without `--allow-other`.
    pub allow_other: Option<bool>,
    /// `status --check` fails when the newest backup is older than this many seconds.
    pub max_backup_age_secs: Option<u64>,
    /// The `[retention]` table: the policy `vmref prune` applies when given no `--keep-*`
    /// flag.
    pub retention: Option<Retention>,
    /// Where and as whom a store with an `s3://` repository reaches it.
    #[serde(default)]
    pub s3: S3Config,
}

/// The `[retention]` table: the keys of `prune`'s `--keep-*` flags, with underscores. Kept
/// apart from `backup::retention::Policy` so that this module stays below `backup`; the
/// command turns it into a policy.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
}

impl Retention {
    fn rules(&self) -> [(&'static str, Option<u32>); 6] {
        [
            ("keep_last", self.keep_last),
            ("keep_hourly", self.keep_hourly),
            ("keep_daily", self.keep_daily),
            ("keep_weekly", self.keep_weekly),
            ("keep_monthly", self.keep_monthly),
            ("keep_yearly", self.keep_yearly),
        ]
    }

    /// At least one rule, none of them 0: found when the file is read, not at the first
    /// nightly prune.
    fn validate(&self) -> std::result::Result<(), String> {
        let rules = self.rules();
        if rules.iter().all(|(_, n)| n.is_none()) {
            let keys: Vec<&str> = rules.iter().map(|(k, _)| *k).collect();
            return Err(format!(
                "[retention] needs at least one of {}",
                keys.join(", ")
            ));
        }
        match rules.iter().find(|(_, n)| *n == Some(0)) {
            Some((k, _)) => Err(format!("[retention] {k} must be at least 1")),
            None => Ok(()),
        }
    }
}

/// The `[s3]` table. The environment (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`
/// with `AWS_SECRET_ACCESS_KEY`) wins over each key, as for the AWS tools.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// `https://host[:port]` (plain http only for a loopback address); default AWS's
    /// endpoint for the region.
    pub endpoint: Option<String>,
    /// Signing region; default "us-east-1".
    pub region: Option<String>,
    /// Path-style URLs (`ENDPOINT/BUCKET/KEY`, the default) or virtual-hosted ones
    /// (`BUCKET.HOST/KEY`).
    pub path_style: Option<bool>,
    /// A TOML file with `access_key_id` and `secret_access_key`, mode 0600.
    pub credentials_file: Option<PathBuf>,
    /// Bytes of the local read cache (`STORE/cache/s3/`): a number with an optional K, M, G
    /// or T suffix (powers of 1024); 0 turns the cache off. Default 1G.
    pub cache_size: Option<String>,
}

/// A size in bytes: digits with an optional K, M, G or T suffix (powers of 1024).
///
/// # Errors
/// A message naming the value.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let bad = || format!("size {s:?}: want a number with an optional K, M, G or T suffix");
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num.trim().parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

impl Config {
    /// Load the config: the named file (which must exist), else the system file if present.
    ///
    /// # Errors
    /// A missing named file or a file that is not valid TOML for these keys.
    pub fn load(explicit: Option<&Path>) -> Result<Config> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None if Path::new(SYSTEM_CONFIG).exists() => PathBuf::from(SYSTEM_CONFIG),
            None => return Ok(Config::default()),
        };
        let text = std::fs::read_to_string(&path).map_err(Error::io("read config", &path))?;
        Self::parse(&text).map_err(|why| Error::Format {
            path,
            source: FormatError::Invalid {
                what: "config",
                why,
            },
        })
    }

    pub fn parse(text: &str) -> std::result::Result<Config, String> {
        let c: Config = toml::from_str(text).map_err(|e| e.message().to_string())?;
        if let Some(r) = &c.retention {
            r.validate()?;
        }
        if let Some(s) = &c.s3.cache_size {
            parse_size(s).map_err(|why| format!("[s3] cache_size: {why}"))?;
        }
        Ok(c)
    }

    /// `--store`, else `$VMREF_STORE`, else the config's `store`, else the default.
    pub fn store_path(&self, flag: Option<&Path>) -> PathBuf {
        if let Some(p) = flag {
            return p.to_path_buf();
        }
        if let Some(p) = std::env::var_os("VMREF_STORE").filter(|v| !v.is_empty()) {
            return PathBuf::from(p);
        }
        self.store
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STORE))
    }

    pub fn flush_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.flush_interval_secs.unwrap_or(5).max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_unknown_keys_fail() {
        let ex = include_str!("../config.example.toml");
        let c = Config::parse(ex).unwrap();
        assert_eq!(c, Config::default(), "the example only has comments");
        let uncommented: String = ex
            .lines()
            .map(|l| {
                if l.starts_with('[') {
                    return l;
                }
                l.strip_prefix("# ")
                    .filter(|r| r.contains(" = ") || r.starts_with('['))
                    .unwrap_or("")
            })
            .collect::<Vec<_>>()
            .join("\n");
        let c = Config::parse(&uncommented).unwrap();
        assert_eq!(c.store.as_deref(), Some(Path::new(DEFAULT_STORE)));
        assert_eq!(c.retention.and_then(|r| r.keep_daily), Some(7));
        assert_eq!(c.s3.path_style, Some(true), "every [s3] key is documented");
        assert!(c.s3.endpoint.is_some() && c.s3.credentials_file.is_some());
        assert!(Config::parse("nope = 1").is_err());
    }

    #[test]
    fn sizes_parse_with_suffixes_and_bad_ones_fail() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size(" 2 T "), Ok(2 << 40));
        for bad in ["", "G", "1.5G", "-1", "1P", "1KB", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert!(Config::parse("[s3]\ncache_size = \"512M\"\n").is_ok());
        let e = Config::parse("[s3]\ncache_size = \"lots\"\n").unwrap_err();
        assert!(e.contains("cache_size"), "{e}");
    }

    #[test]
    fn retention_table_needs_a_valid_rule() {
        let c = Config::parse("[retention]\nkeep_daily = 7\nkeep_weekly = 4\n").unwrap();
        let r = c.retention.unwrap();
        assert_eq!(
            (r.keep_daily, r.keep_weekly, r.keep_last),
            (Some(7), Some(4), None)
        );
        for bad in [
            "[retention]\n",
            "[retention]\nkeep_daily = 0\n",
            "[retention]\nkeep_dayly = 7\n",
            "[retention]\nkeep_daily = -1\n",
            "[retention]\nkeep_daily = \"7\"\n",
        ] {
            assert!(Config::parse(bad).is_err(), "{bad:?}");
        }
        let err = Config::parse("[retention]\nkeep_daily = 0\n").unwrap_err();
        assert!(err.contains("keep_daily must be at least 1"), "{err}");
    }
}
