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
    /// Where and as whom a store with an `s3://` repository reaches it.
    #[serde(default)]
    pub s3: S3Config,
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
        toml::from_str(text).map_err(|e| e.message().to_string())
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
                    .filter(|r| r.contains(" = "))
                    .unwrap_or("")
            })
            .collect::<Vec<_>>()
            .join("\n");
        let c = Config::parse(&uncommented).unwrap();
        assert_eq!(c.store.as_deref(), Some(Path::new(DEFAULT_STORE)));
        assert_eq!(c.s3.path_style, Some(true), "every [s3] key is documented");
        assert!(c.s3.endpoint.is_some() && c.s3.credentials_file.is_some());
        assert!(Config::parse("nope = 1").is_err());
    }
}
