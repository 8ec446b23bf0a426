//! `backup`, `restore`, `verify`, `prune`.

use std::io::Write;
use std::path::Path;

use super::{Ctx, human};
use crate::backup::manage::PruneArgs;
use crate::control;
use crate::error::{Error, Result};

pub(super) fn backup(
    cx: &mut Ctx<'_, impl Write>,
    name: &str,
    owner: Option<&str>,
    full: bool,
    since: Option<&str>,
    json: bool,
) -> Result<()> {
    let s = cx.open_store()?;
    let r = control::backup(&s, name, owner, full, since, cx.progress)?;
    for w in &r.warnings {
        eprintln!("vmref: warning: {w}");
    }
    if json {
        return cx.print_json(&r);
    }
    let b = r.point.backup.as_ref();
    cx.emit(format!(
        "backup {}: {}{}, {} blocks stored ({})",
        r.point.name,
        b.map(|b| b.kind.as_str()).unwrap_or("?"),
        b.and_then(|b| b.since.as_ref())
            .map(|s| format!(" since {s}"))
            .unwrap_or_default(),
        b.map(|b| b.stored_blocks).unwrap_or(0),
        human(b.map(|b| b.stored_bytes).unwrap_or(0)),
    ))
}

pub(super) fn restore(
    cx: &mut Ctx<'_, impl Write>,
    point: &str,
    disk: &str,
    to: &Path,
    force: bool,
) -> Result<()> {
    let s = cx.open_store()?;
    let r = control::restore(&s, point, disk, to, force, cx.progress)?;
    cx.emit(format!(
        "restored {} disk {} to {} ({}, {} of data)",
        r.point,
        r.disk,
        to.display(),
        human(r.size),
        human(r.data_bytes)
    ))
}

pub(super) fn verify(
    cx: &mut Ctx<'_, impl Write>,
    point: Option<&str>,
    repair: bool,
    from: &[std::path::PathBuf],
    json: bool,
) -> Result<()> {
    let s = cx.open_store()?;
    let r = control::verify(&s, point, repair, from, cx.progress)?;
    if json {
        cx.print_json(&r)?;
    } else {
        for d in &r.repaired {
            let at = d.block.map(|b| format!(" block {b}")).unwrap_or_default();
            // `what` says from where (and, for a map node, which one).
            cx.emit(format!(
                "repaired: point {} disk {}{at} {}",
                d.point, d.disk, d.what
            ))?;
        }
        for d in &r.damaged {
            let at = d.block.map(|b| format!(" block {b}")).unwrap_or_default();
            cx.emit(format!(
                "damaged: point {} disk {}{at}: {}",
                d.point, d.disk, d.what
            ))?;
        }
        cx.emit(format!(
            "checked {} stored blocks ({}) of {} point(s): {}",
            r.checked_blocks,
            human(r.checked_bytes),
            r.points.len(),
            if r.damaged.is_empty() {
                "all good".to_string()
            } else {
                format!("{} damaged", r.damaged.len())
            }
        ))?;
    }
    if r.damaged.is_empty() {
        Ok(())
    } else {
        Err(Error::VerifyFailed(r.damaged.len() as u64))
    }
}

pub(super) fn prune(cx: &mut Ctx<'_, impl Write>, args: &PruneArgs, json: bool) -> Result<()> {
    let s = cx.open_store()?;
    let r = control::prune(&s, args)?;
    if json {
        return cx.print_json(&r);
    }
    let whose = match &r.owner {
        Some(o) => format!("of owner {o}"),
        None => "without an owner".to_string(),
    };
    if r.dry_run {
        for k in &r.kept {
            let rules: Vec<&str> = k.rules.iter().map(|r| r.as_str()).collect();
            cx.emit(format!("keep   {} ({})", k.name, rules.join(", ")))?;
        }
        for d in &r.deleted {
            cx.emit(format!("delete {d}"))?;
        }
        return cx.emit(format!(
            "dry run: would prune {} and keep {} restorable point(s) {whose}; nothing deleted",
            r.deleted.len(),
            r.kept.len()
        ));
    }
    if r.deleted.is_empty() {
        let mut line = format!(
            "nothing to prune ({} restorable point(s) {whose})",
            r.kept.len()
        );
        if r.freed_bytes > 0 {
            line += &format!(
                "; freed {} an earlier collection left",
                human(r.freed_bytes)
            );
        }
        cx.emit(line)?;
        return match &r.collection_put_off {
            Some(why) => cx.emit(format!("space still not reclaimed: {why}")),
            None => Ok(()),
        };
    }
    cx.emit(format!(
        "pruned {} point(s) ({}), kept {}, freed {}",
        r.deleted.len(),
        r.deleted.join(", "),
        r.kept.len(),
        human(r.freed_bytes)
    ))?;
    match &r.collection_put_off {
        Some(why) => cx.emit(format!(
            "space not reclaimed yet: {why}; a later prune or delete reclaims it"
        )),
        None => Ok(()),
    }
}
