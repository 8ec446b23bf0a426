//! `ref create`, `ref demote`, `ref list`, `ref show`, `ref delete`, and `changes`.

use std::io::Write;

use super::{Ctx, human, rfc3339, seqs, state_name};
use crate::control::{self, Deleted};
use crate::engine::DiskChanges;
use crate::error::{Error, Result};
use crate::store::records::RefRecord;

pub(super) fn create(
    cx: &mut Ctx<'_, impl Write>,
    name: &str,
    owner: Option<&str>,
    checkpoint: bool,
) -> Result<()> {
    let s = cx.open_store()?;
    let r = control::ref_create(&s, name, owner, checkpoint)?;
    let what = if checkpoint {
        "checkpoint"
    } else {
        "reference point"
    };
    cx.emit(format!("created {what} {} ({})", r.name, seqs(&r)))
}

pub(super) fn demote(cx: &mut Ctx<'_, impl Write>, name: &str) -> Result<()> {
    let s = cx.open_store()?;
    let r = control::ref_demote(&s, name)?;
    cx.emit(format!("demoted {} to a {} point", r.name, state_name(&r)))
}

/// Reads the atomically replaced point records: needs neither the engine nor the daemon.
pub(super) fn list(cx: &mut Ctx<'_, impl Write>, owner: Option<String>, json: bool) -> Result<()> {
    let s = cx.open_store()?;
    let refs: Vec<RefRecord> = s
        .refs()?
        .into_iter()
        .filter(|r| owner.is_none() || r.owner == owner)
        .collect();
    if json {
        return cx.print_json(&refs);
    }
    cx.emit(format!(
        "{:<24} {:<10} {:<12} {:<20} SEQUENCE",
        "NAME", "STATE", "OWNER", "CREATED"
    ))?;
    for r in &refs {
        cx.emit(format!(
            "{:<24} {:<10} {:<12} {:<20} {}",
            r.name,
            state_name(r),
            r.owner.as_deref().unwrap_or("-"),
            rfc3339(r.created_unix),
            seqs(r)
        ))?;
    }
    Ok(())
}

/// Reads the point's record: needs neither the engine nor the daemon.
pub(super) fn show(cx: &mut Ctx<'_, impl Write>, name: &str, json: bool) -> Result<()> {
    let s = cx.open_store()?;
    let r = s.read_ref(name)?;
    if json {
        return cx.print_json(&r);
    }
    cx.emit(format!("name:     {}", r.name))?;
    cx.emit(format!("id:       {}", r.id))?;
    cx.emit(format!("created:  {}", rfc3339(r.created_unix)))?;
    cx.emit(format!("owner:    {}", r.owner.as_deref().unwrap_or("-")))?;
    cx.emit(format!("state:    {}", state_name(&r)))?;
    for (d, p) in &r.disks {
        cx.emit(format!("disk:     {d} seq {} size {}", p.seq, p.size))?;
    }
    if let Some(b) = &r.backup {
        cx.emit(format!(
            "backup:   {} {} blocks, {} stored{}",
            b.kind,
            b.stored_blocks,
            human(b.stored_bytes),
            b.since
                .as_ref()
                .map(|s| format!(", since {s}"))
                .unwrap_or_default()
        ))?;
    }
    Ok(())
}

pub(super) fn delete(cx: &mut Ctx<'_, impl Write>, name: &str) -> Result<()> {
    let s = cx.open_store()?;
    match control::ref_delete(&s, name)? {
        Deleted::DamagedRecord => cx.emit(format!("deleted damaged reference point record {name}")),
        Deleted::Point(_) => cx.emit(format!("deleted reference point {name}")),
    }
}

pub(super) fn changes(
    cx: &mut Ctx<'_, impl Write>,
    since: &str,
    disk: Option<&str>,
    json: bool,
) -> Result<()> {
    let s = cx.open_store()?;
    let changes = control::changes(&s, since, disk)?;
    if json {
        // Straight from the typed result (no `Value` tree): a 1 TiB disk can have hundreds of
        // thousands of extents. Its fields are in the order they always printed.
        #[derive(serde::Serialize)]
        struct Doc<'a> {
            since: &'a str,
            disks: &'a [DiskChanges],
        }
        let doc = Doc {
            since,
            disks: &changes,
        };
        serde_json::to_writer_pretty(&mut *cx.out, &doc)
            .map_err(|e| Error::io("write", "stdout")(e.into()))?;
        return cx.emit("");
    }
    for d in &changes {
        if !d.in_point {
            cx.emit(format!(
                "# {}: not registered when {since} was created: all of it is new",
                d.disk
            ))?;
        }
        for e in &d.extents {
            writeln!(cx.out, "{}\t{}\t{}", d.disk, e.offset, e.length)
                .map_err(Error::io("write", "stdout"))?;
        }
    }
    Ok(())
}
