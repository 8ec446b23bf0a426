//! The commands: each turns parsed arguments into library calls and prints the result, as
//! text or as one JSON document with `--json`.

use std::io::Write;

use serde_json::Value;

use crate::backup::{self, manage::PruneReport, progress::Bar, run::BackupReport};
use crate::cli::{Cli, Command, DiskCmd, RefCmd};
use crate::config::Config;
use crate::control::{self, Request};
use crate::engine::DiskChanges;
use crate::error::{Error, Result};
use crate::store::records::RefRecord;
use crate::store::{self, DEFAULT_BLOCK_SIZE, Store};

/// Run one parsed command.
///
/// # Errors
/// Whatever the command reports; the caller prints it as one line.
pub fn run(cli: Cli) -> Result<()> {
    // Buffered: stdout alone is line-buffered, and `changes` can print a few hundred thousand
    // lines (one write(2) each cost ~200 ms for 1 % of a 1 TiB disk).
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let r = run_to(cli, &mut out);
    let flushed = out.flush().map_err(Error::io("write", "stdout"));
    r.and(flushed)
}

fn run_to(cli: Cli, out: &mut impl Write) -> Result<()> {
    let config = Config::load(cli.config.as_deref())?;
    let root = config.store_path(cli.store.as_deref());
    let quiet = cli.quiet;
    match cli.command {
        Command::Init { block_size } => {
            let bs = match block_size.or(config.block_size.clone()) {
                Some(s) => store::parse_block_size(&s)?,
                None => DEFAULT_BLOCK_SIZE,
            };
            let s = Store::init(&root, bs)?;
            emit(
                out,
                format!(
                    "initialized store {} (block size {})",
                    s.root().display(),
                    human(bs as u64)
                ),
            )
        }
        Command::Disk(DiskCmd::Add { name, image }) => {
            let s = Store::open(&root)?;
            control::run(
                &s,
                &Request::DiskAdd {
                    name: name.clone(),
                    image,
                },
            )?;
            emit(out, format!("disk {name} added"))
        }
        Command::Disk(DiskCmd::List { json }) => {
            let s = Store::open(&root)?;
            let disks = s.disks()?;
            if json {
                return print_json(out, &serde_json::to_value(&disks).expect("serializes"));
            }
            for d in disks {
                let size = std::fs::metadata(&d.image)
                    .map(|m| human(m.len()))
                    .unwrap_or_else(|_| "missing".into());
                emit(out, format!("{}\t{}\t{}", d.name, size, d.image.display()))?;
            }
            Ok(())
        }
        Command::Disk(DiskCmd::Remove { name }) => {
            let s = Store::open(&root)?;
            control::run(&s, &Request::DiskRemove { name: name.clone() })?;
            emit(out, format!("disk {name} removed (its image is untouched)"))
        }
        Command::Ref(RefCmd::Create {
            name,
            owner,
            checkpoint,
        }) => {
            let s = Store::open(&root)?;
            let v = control::run(
                &s,
                &Request::RefCreate {
                    name,
                    owner,
                    checkpoint,
                },
            )?;
            let r: RefRecord =
                serde_json::from_value(v).map_err(|e| Error::Daemon(e.to_string()))?;
            let what = if checkpoint {
                "checkpoint"
            } else {
                "reference point"
            };
            emit(out, format!("created {what} {} ({})", r.name, seqs(&r)))
        }
        Command::Ref(RefCmd::Demote { name }) => {
            let s = Store::open(&root)?;
            let v = control::run(&s, &Request::RefDemote { name })?;
            let r: RefRecord =
                serde_json::from_value(v).map_err(|e| Error::Daemon(e.to_string()))?;
            emit(
                out,
                format!("demoted {} to a {} point", r.name, state_name(&r)),
            )
        }
        Command::Ref(RefCmd::List { owner, json }) => {
            let s = Store::open(&root)?;
            let refs: Vec<RefRecord> = s
                .refs()?
                .into_iter()
                .filter(|r| owner.is_none() || r.owner == owner)
                .collect();
            if json.json {
                return print_json(out, &serde_json::to_value(&refs).expect("serializes"));
            }
            emit(
                out,
                format!(
                    "{:<24} {:<10} {:<12} {:<20} SEQUENCE",
                    "NAME", "STATE", "OWNER", "CREATED"
                ),
            )?;
            for r in &refs {
                emit(
                    out,
                    format!(
                        "{:<24} {:<10} {:<12} {:<20} {}",
                        r.name,
                        state_name(r),
                        r.owner.as_deref().unwrap_or("-"),
                        rfc3339(r.created_unix),
                        seqs(r)
                    ),
                )?;
            }
            Ok(())
        }
        Command::Ref(RefCmd::Show { name, json }) => {
            let s = Store::open(&root)?;
            let r = s.read_ref(&name)?;
            if json.json {
                return print_json(out, &serde_json::to_value(&r).expect("serializes"));
            }
            emit(out, format!("name:     {}", r.name))?;
            emit(out, format!("id:       {}", r.id))?;
            emit(out, format!("created:  {}", rfc3339(r.created_unix)))?;
            emit(
                out,
                format!("owner:    {}", r.owner.as_deref().unwrap_or("-")),
            )?;
            emit(out, format!("state:    {}", state_name(&r)))?;
            for (d, p) in &r.disks {
                emit(out, format!("disk:     {d} seq {} size {}", p.seq, p.size))?;
            }
            if let Some(b) = &r.backup {
                emit(
                    out,
                    format!(
                        "backup:   {} {} blocks, {} stored{}",
                        b.kind,
                        b.stored_blocks,
                        human(b.stored_bytes),
                        b.since
                            .as_ref()
                            .map(|s| format!(", since {s}"))
                            .unwrap_or_default()
                    ),
                )?;
            }
            Ok(())
        }
        Command::Ref(RefCmd::Delete { name }) => {
            let s = Store::open(&root)?;
            // A damaged record stops the engine from opening at all (it cannot know which
            // numbers the point held), so it is removed directly, under the store lock; its
            // backup data, if any, is collected at the next open.
            if let Err(Error::Format { .. }) = s.read_ref(&name) {
                let _lock = crate::store::lock::StoreLock::try_acquire(s.root())?;
                s.remove_ref_record(&name)?;
                return emit(
                    out,
                    format!("deleted damaged reference point record {name}"),
                );
            }
            control::run(&s, &Request::RefDelete { name: name.clone() })?;
            emit(out, format!("deleted reference point {name}"))
        }
        Command::Changes { since, disk, json } => {
            let s = Store::open(&root)?;
            let req = Request::Changes {
                since: since.clone(),
                disk: disk.clone(),
            };
            // Typed all the way: a 1 TiB disk can have hundreds of thousands of extents.
            let changes: Vec<DiskChanges> =
                control::run_typed(&s, &req, |e| e.changes(&since, disk.as_deref()))?;
            if json {
                #[derive(serde::Serialize)]
                struct Doc<'a> {
                    since: &'a str,
                    disks: &'a [DiskChanges],
                }
                let doc = Doc {
                    since: &since,
                    disks: &changes,
                };
                serde_json::to_writer_pretty(&mut *out, &doc)
                    .map_err(|e| Error::io("write", "stdout")(e.into()))?;
                return emit(out, String::new());
            }
            for d in &changes {
                if !d.in_point {
                    emit(
                        out,
                        format!(
                            "# {}: not registered when {since} was created: all of it is new",
                            d.disk
                        ),
                    )?;
                }
                for e in &d.extents {
                    writeln!(out, "{}\t{}\t{}", d.disk, e.offset, e.length)
                        .map_err(Error::io("write", "stdout"))?;
                }
            }
            Ok(())
        }
        Command::Mount {
            mountpoint,
            foreground,
            allow_other,
        } => {
            let opts = crate::daemon::MountOptions {
                mountpoint,
                foreground,
                allow_other: allow_other || config.allow_other.unwrap_or(false),
                flush_interval: config.flush_interval(),
            };
            crate::daemon::mount(&root, &opts)
        }
        Command::Umount { mountpoint } => {
            let msg = crate::daemon::umount(&mountpoint)?;
            emit(out, msg)
        }
        Command::Backup {
            name,
            full,
            since,
            json,
        } => {
            let s = Store::open(&root)?;
            let bar = Bar::new(quiet);
            let v = control::run_with(&s, &Request::Backup { name, full, since }, &bar)?;
            let r: BackupReport =
                serde_json::from_value(v.clone()).map_err(|e| Error::Daemon(e.to_string()))?;
            for w in &r.warnings {
                eprintln!("vmref: warning: {w}");
            }
            if json {
                return print_json(out, &v);
            }
            let b = r.point.backup.as_ref();
            emit(
                out,
                format!(
                    "backup {}: {}{}, {} blocks stored ({})",
                    r.point.name,
                    b.map(|b| b.kind.as_str()).unwrap_or("?"),
                    b.and_then(|b| b.since.as_ref())
                        .map(|s| format!(" since {s}"))
                        .unwrap_or_default(),
                    b.map(|b| b.stored_blocks).unwrap_or(0),
                    human(b.map(|b| b.stored_bytes).unwrap_or(0)),
                ),
            )
        }
        Command::Restore {
            point,
            disk,
            to,
            force,
        } => {
            let s = Store::open(&root)?;
            let r = backup::restore::restore(&s, &point, &disk, &to, force, &Bar::new(quiet))?;
            emit(
                out,
                format!(
                    "restored {} disk {} to {} ({}, {} of data)",
                    r.point,
                    r.disk,
                    to.display(),
                    human(r.size),
                    human(r.data_bytes)
                ),
            )
        }
        Command::Verify { point, json } => {
            let s = Store::open(&root)?;
            let r = backup::verify::verify(&s, point.as_deref(), &Bar::new(quiet))?;
            if json {
                print_json(out, &serde_json::to_value(&r).expect("serializes"))?;
            } else {
                for d in &r.damaged {
                    let at = d.block.map(|b| format!(" block {b}")).unwrap_or_default();
                    emit(
                        out,
                        format!("damaged: point {} disk {}{at}: {}", d.point, d.disk, d.what),
                    )?;
                }
                emit(
                    out,
                    format!(
                        "checked {} stored blocks ({}) of {} point(s): {}",
                        r.checked_blocks,
                        human(r.checked_bytes),
                        r.points.len(),
                        if r.damaged.is_empty() {
                            "all good".to_string()
                        } else {
                            format!("{} damaged", r.damaged.len())
                        }
                    ),
                )?;
            }
            if r.damaged.is_empty() {
                Ok(())
            } else {
                Err(Error::VerifyFailed(r.damaged.len() as u64))
            }
        }
        Command::Prune { keep_last } => {
            let s = Store::open(&root)?;
            let v = control::run(&s, &Request::Prune { keep_last })?;
            let r: PruneReport =
                serde_json::from_value(v).map_err(|e| Error::Daemon(e.to_string()))?;
            if r.deleted.is_empty() {
                return emit(
                    out,
                    format!("nothing to prune ({} restorable point(s))", r.kept.len()),
                );
            }
            emit(
                out,
                format!(
                    "pruned {} point(s) ({}), kept {}, freed {}",
                    r.deleted.len(),
                    r.deleted.join(", "),
                    r.kept.len(),
                    human(r.freed_bytes)
                ),
            )
        }
        Command::Status { json } => {
            let s = Store::open(&root)?;
            let v = control::run(&s, &Request::Status)?;
            if json {
                return print_json(out, &v);
            }
            emit(out, format!("store:      {}", s.root().display()))?;
            emit(out, format!("block size: {}", human(s.block_size() as u64)))?;
            emit(
                out,
                format!("points:     {} ({} restorable)", v["refs"], v["restorable"]),
            )?;
            for d in v["disks"].as_array().into_iter().flatten() {
                let name = d["name"].as_str().unwrap_or("?");
                let image = d["image"].as_str().unwrap_or("?");
                let tracking = d["tracking"].as_str().unwrap_or("?");
                if d["size"].is_null() {
                    emit(out, format!("disk {name}: {image}, {tracking}"))?;
                    continue;
                }
                let line = format!(
                    "disk {name}: {} bytes, {image}, seq {}, tracking {tracking}",
                    d["size"], d["current_seq"]
                );
                emit(out, line)?;
            }
            Ok(())
        }
    }
}

fn emit(out: &mut impl Write, line: String) -> Result<()> {
    writeln!(out, "{line}").map_err(Error::io("write", "stdout"))
}

fn print_json(out: &mut impl Write, v: &Value) -> Result<()> {
    emit(out, serde_json::to_string_pretty(v).expect("serializes"))
}

fn state_name(r: &RefRecord) -> &'static str {
    match r.state {
        crate::store::records::RefState::Plain => "plain",
        crate::store::records::RefState::Checkpoint => "checkpoint",
        crate::store::records::RefState::Restorable => "restorable",
    }
}

fn seqs(r: &RefRecord) -> String {
    if r.disks.is_empty() {
        return "no disks".into();
    }
    r.disks
        .iter()
        .map(|(d, p)| format!("{d}@{}", p.seq))
        .collect::<Vec<_>>()
        .join(",")
}

/// Bytes as a short human figure (binary units).
pub fn human(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", U[i])
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_sizes() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(human(65536), "64 KiB");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(12), "12 B");
    }
}
