//! `init`, `status`, `mount`, `umount`.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{Ctx, human};

use crate::backup::data::backend;
use crate::backup::outcome::{LastBackup, Outcome};
use crate::control;
use crate::error::{Error, Result};
use crate::repo::compress::{Compression, DEFAULT_COMPRESSION};
use crate::repo::key::{KEY_FILE_NAME, RepoKey};
use crate::repo::repository::{RepoOptions, Repository};
use crate::store::lock::StoreLock;
use crate::store::{self, DEFAULT_BLOCK_SIZE, Store};
use crate::upgrade::UpgradeReport;

pub(super) fn init(
    cx: &mut Ctx<'_, impl Write>,
    block_size: Option<String>,
    compression: Option<String>,
    repository: Option<String>,
    encrypt: bool,
    key_file: Option<PathBuf>,
) -> Result<()> {
    let bs = match block_size.or(cx.config.block_size.clone()) {
        Some(s) => store::parse_block_size(&s)?,
        None => DEFAULT_BLOCK_SIZE,
    };
    let opts = RepoOptions {
        compression: match compression.or(cx.config.compression.clone()) {
            Some(c) => c.parse::<Compression>().map_err(Error::BadArgument)?,
            None => DEFAULT_COMPRESSION,
        },
        ..RepoOptions::default()
    };
    if let Some(r) = &repository {
        check_location(r)?;
    }
    // Read (or made) before the store directory is touched: a bad key file changes nothing.
    let key = match (&key_file, encrypt) {
        (Some(p), _) => Some(RepoKey::load(p)?),
        (None, true) => Some(RepoKey::generate()?),
        (None, false) => None,
    };
    let s = Store::init_at(&cx.root, bs, repository.clone(), |root| {
        let kp = root.join(KEY_FILE_NAME);
        if let Some(k) = &key {
            k.save(&kp)?;
        }
        let r = backend(root, repository.as_deref())
            .and_then(|b| Repository::init_with_key(b, opts, key.as_ref()));
        if r.is_err() && key.is_some() {
            // `init` may simply be run again: leave no key for a repository never made.
            let _ = crate::store::atomic::remove_durable(&kp);
        }
        r.map(|_| ())
    })?;
    let enc = match &key {
        Some(k) => format!(
            "encrypted, key id {}, key file {}",
            k.key_id(),
            s.root().join(KEY_FILE_NAME).display()
        ),
        None => "not encrypted".into(),
    };
    cx.emit(format!(
        "initialized store {} (block size {}, compression {}, repository {}, {enc})",
        s.root().display(),
        human(bs as u64),
        opts.compression,
        repository.unwrap_or_else(|| s.repo_dir().display().to_string())
    ))?;
    if key.is_some() {
        cx.emit(format!(
            "keep a copy of {} somewhere safe: without it the backups cannot be read",
            s.root().join(KEY_FILE_NAME).display()
        ))?;
    }
    Ok(())
}

/// A repository location: `s3://BUCKET[/PREFIX]` or an absolute directory path.
fn check_location(r: &str) -> Result<()> {
    if crate::s3::is_location(r) {
        crate::s3::parse_location(r)?;
        Ok(())
    } else if Path::new(r).is_absolute() {
        Ok(())
    } else {
        Err(Error::BadArgument(format!(
            "repository {r:?}: a repository location is s3://BUCKET[/PREFIX] or an absolute \
             directory path"
        )))
    }
}

/// `init --repository LOC --attach`: a new store over an existing repository, deduplicating
/// against every store already in it. Its points are published there like every store's
/// (`backup::shared`), so each store's collection keeps the others' blocks.
pub(super) fn attach(
    cx: &mut Ctx<'_, impl Write>,
    block_size: Option<String>,
    repository: String,
    key_file: Option<PathBuf>,
) -> Result<()> {
    let bs = match block_size.or(cx.config.block_size.clone()) {
        Some(s) => store::parse_block_size(&s)?,
        None => DEFAULT_BLOCK_SIZE,
    };
    check_location(&repository)?;
    // A store's own STORE/repo is not shared: that store (format 2.0) stays readable by
    // releases that would collect another store's blocks there.
    if let Some(parent) = std::path::Path::new(&repository).parent()
        && parent.join(store::META_FILE).exists()
    {
        return Err(Error::BadArgument(format!(
            "{repository} is the private repository of the store {}; stores share a \
             repository made with `vmref init --repository LOCATION`",
            parent.display()
        )));
    }
    let key = key_file.as_deref().map(RepoKey::load).transpose()?;
    let mut summary = String::new();
    let s = Store::init_at(&cx.root, bs, Some(repository.clone()), |root| {
        let b = backend(root, Some(&repository))?;
        let repo = Repository::open_with_key(b, key.as_ref()).map_err(|e| match e {
            Error::NotAStore(..) => Error::BadArgument(format!(
                "repository {repository}: there is none to attach to (no config); \
                 make one with `vmref init --repository {repository}`"
            )),
            e => e,
        })?;
        let be = repo.backend();
        // A store made before points were published may hold points no other store can
        // see: its blocks would be garbage to our collections.
        let stores = crate::repo::snapshot::marked_stores(&**be)?;
        if stores.is_empty() && !be.list(crate::repo::index::INDEX_PREFIX)?.is_empty() {
            return Err(Error::BadArgument(format!(
                "repository {repository} holds backups of a store that has not published its \
                 points yet; run `vmref backup` or `vmref prune` on that store with this version \
                 of vmref first"
            )));
        }
        if let Some(k) = &key {
            if repo.config().key_id.is_none() {
                return Err(Error::BadArgument(format!(
                    "repository {repository} is not encrypted: attach without --key-file"
                )));
            }
            k.save(&root.join(KEY_FILE_NAME))?;
        }
        summary = format!(
            "{} other store(s), compression {}, {}",
            stores.len(),
            repo.config().compression,
            match &repo.config().key_id {
                Some(id) => format!("encrypted, key id {id}"),
                None => "not encrypted".into(),
            }
        );
        Ok(())
    })?;
    cx.emit(format!(
        "initialized store {} (block size {}) attached to repository {repository} ({summary})",
        s.root().display(),
        human(bs as u64),
    ))
}

pub(super) fn upgrade(cx: &mut Ctx<'_, impl Write>, json: bool) -> Result<()> {
    let mut s = cx.open_store()?;
    let report = match StoreLock::try_acquire(s.root()) {
        Ok(_lock) => crate::upgrade::upgrade(&mut s, cx.progress)?,
        // A mounted daemon upgraded the store when it opened it.
        Err(Error::Locked(_)) if s.format() >= store::STORE_FORMAT => UpgradeReport {
            from: s.format(),
            to: s.format(),
            ..Default::default()
        },
        Err(e) => return Err(e),
    };
    if json {
        return cx.print_json(&report);
    }
    if report.from == report.to {
        cx.emit(format!(
            "store {} is already in format {}",
            s.root().display(),
            report.to
        ))
    } else {
        cx.emit(format!(
            "upgraded store {} from format {} to {}: {} restorable point(s), {} stored block(s) read",
            s.root().display(),
            report.from,
            report.to,
            report.points,
            report.blocks
        ))
    }
}

pub(super) fn status(cx: &mut Ctx<'_, impl Write>, json: bool) -> Result<()> {
    let s = cx.open_store()?;
    let st = control::status(&s)?;
    if json {
        return cx.print_json(&st);
    }
    cx.emit(format!("store:      {}", s.root().display()))?;
    cx.emit(format!("block size: {}", human(s.block_size() as u64)))?;
    cx.emit(format!("repository: {}", st.repository))?;
    cx.emit(format!(
        "points:     {} ({} restorable)",
        st.refs, st.restorable
    ))?;
    let sp = &st.space;
    cx.emit(format!(
        "backups:    {} stored for {} of point images ({:.2}x; {} distinct blocks and map nodes, {} before compression)",
        human(sp.stored_bytes),
        human(sp.logical_bytes),
        sp.ratio,
        sp.blobs,
        human(sp.raw_bytes)
    ))?;
    if let Some(o) = &st.store_outage {
        let when = |t: u64| crate::store::now_unix().saturating_sub(t);
        cx.emit(match o.until_unix {
            None => format!(
                "store away: its filesystem left its path {} s ago; live disks refuse writes \
                 ({} so far)",
                when(o.since_unix),
                o.writes_refused
            ),
            Some(u) => format!(
                "store outage: its filesystem was away for {} s, back {} s ago; {} write(s) \
                 refused meanwhile, none taken untracked",
                u.saturating_sub(o.since_unix),
                when(u),
                o.writes_refused
            ),
        })?;
    }
    if let Some((n, why)) = &st.log_held {
        cx.emit(format!(
            "daemon log: {n} line(s) held in memory, not yet written ({why}); they are \
             written once the log takes them"
        ))?;
    }
    cx.emit(match &st.encryption_key_id {
        Some(id) => format!(
            "encryption: on, key id {id} (key file {})",
            s.root().join(crate::repo::key::KEY_FILE_NAME).display()
        ),
        None => "encryption: off".into(),
    })?;
    if let Some(b) = &st.last_backup {
        cx.emit(format!("last backup: {}", last_backup_line(b)))?;
    }
    for d in &st.disks {
        let image = d
            .image
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "?".into());
        let (name, tracking) = (&d.name, &d.tracking);
        match d.size {
            None => cx.emit(format!("disk {name}: {image}, {tracking}"))?,
            Some(size) => cx.emit(format!(
                "disk {name}: {size} bytes, {image}, seq {}, tracking {tracking}",
                d.current_seq.unwrap_or_default()
            ))?,
        }
    }
    Ok(())
}

fn last_backup_line(b: &LastBackup) -> String {
    let ago = store::now_unix().saturating_sub(b.finished_unix);
    match (b.result, &b.error) {
        (Outcome::Failed, e) => format!(
            "{} failed after {:.1} s, {ago} s ago: {}",
            b.name,
            b.duration_secs,
            e.as_deref().unwrap_or("unknown error")
        ),
        (Outcome::Running, _) => format!(
            "{} running since {}",
            b.name,
            super::rfc3339(b.started_unix_ms / 1000)
        ),
        (Outcome::Ok, _) => format!(
            "{} ok ({}, {} stored) in {:.1} s, {ago} s ago",
            b.name,
            b.kind.map_or("?", |k| k.as_str()),
            human(b.stored_bytes.unwrap_or(0)),
            b.duration_secs
        ),
    }
}

/// `status --check`: one line, and an error naming every problem a monitor must see.
pub(super) fn check(cx: &mut Ctx<'_, impl Write>, max_age: Option<u64>) -> Result<()> {
    let s = cx.open_store()?;
    let st = control::status(&s)?;
    let refs = s.refs()?;
    let newest = refs
        .iter()
        .rev()
        .find(|r| r.state == crate::store::records::RefState::Restorable);
    let mut problems = Vec::new();
    for d in &st.disks {
        if d.size.is_none() {
            problems.push(format!("disk {}: {}", d.name, d.tracking));
            continue;
        }
        let since = newest.and_then(|n| n.disks.get(&d.name).map(|p| (n, p.seq)));
        if let (Some((n, seq)), Some(base)) = (since, d.tracked_since_seq)
            && seq < base
        {
            let why = d.restart_reason.as_deref().unwrap_or_default();
            problems.push(format!(
                "disk {}: changes since {} are unknown ({why}); the next backup is full",
                d.name, n.name
            ));
        }
    }
    if let Some(b) = st
        .last_backup
        .as_ref()
        .filter(|b| b.result == Outcome::Failed)
    {
        problems.push(format!("the last backup, {}", last_backup_line(b)));
    }
    let now = store::now_unix();
    let age = newest.map(|n| {
        let done = n
            .backup
            .as_ref()
            .map_or(n.created_unix, |b| b.finished_unix);
        now.saturating_sub(done)
    });
    if let Some(max) = max_age.or(cx.config.max_backup_age_secs) {
        match (newest, age) {
            (Some(n), Some(a)) if a > max => problems.push(format!(
                "the newest backup, {}, is {a} s old (more than {max} s)",
                n.name
            )),
            (None, _) => problems.push("no backup yet".to_string()),
            _ => {}
        }
    }
    if !problems.is_empty() {
        return Err(Error::CheckFailed(problems.join("; ")));
    }
    cx.emit(match (newest, age) {
        (Some(n), Some(a)) => format!(
            "ok: {} disk(s) tracked; newest backup {} is {a} s old",
            st.disks.len(),
            n.name
        ),
        _ => format!("ok: {} disk(s) tracked; no backup yet", st.disks.len()),
    })
}

pub(super) fn mount(
    cx: &mut Ctx<'_, impl Write>,
    mountpoint: PathBuf,
    foreground: bool,
    allow_other: bool,
) -> Result<()> {
    let opts = crate::daemon::MountOptions {
        mountpoint,
        foreground,
        allow_other: allow_other || cx.config.allow_other.unwrap_or(false),
        flush_interval: cx.config.flush_interval(),
    };
    crate::daemon::mount(&cx.root, &opts)
}

pub(super) fn mount_repository(
    cx: &mut Ctx<'_, impl Write>,
    mountpoint: PathBuf,
    foreground: bool,
    allow_other: bool,
    location: String,
    key_file: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
) -> Result<()> {
    check_location(&location)?;
    let cache_dir = match cache_dir {
        Some(d) => d,
        None => {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .ok_or_else(|| {
                    Error::BadArgument("no HOME or XDG_CACHE_HOME: give --cache-dir".into())
                })?;
            let h = blake3::hash(location.as_bytes()).to_hex();
            base.join("vmref").join(format!("repo-{}", &h[..16]))
        }
    };
    let opts = crate::daemon::MountOptions {
        mountpoint,
        foreground,
        allow_other: allow_other || cx.config.allow_other.unwrap_or(false),
        flush_interval: cx.config.flush_interval(),
    };
    let r = crate::daemon::RepoMountOptions {
        location,
        key_file,
        cache_dir,
    };
    crate::daemon::mount_repository(&r, &opts)
}

pub(super) fn umount(cx: &mut Ctx<'_, impl Write>, mountpoint: &Path) -> Result<()> {
    let msg = crate::daemon::umount(mountpoint)?;
    cx.emit(msg)
}
