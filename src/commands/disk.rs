//! `disk add`, `disk list`, `disk remove`.

use std::io::Write;
use std::path::Path;

use super::{Ctx, human};
use crate::control;
use crate::error::Result;

pub(super) fn add(cx: &mut Ctx<'_, impl Write>, name: &str, image: &Path) -> Result<()> {
    let s = cx.open_store()?;
    control::disk_add(&s, name, image)?;
    cx.emit(format!("disk {name} added"))
}

/// Reads the atomically replaced disk records: needs neither the engine nor the daemon.
pub(super) fn list(cx: &mut Ctx<'_, impl Write>, json: bool) -> Result<()> {
    let s = cx.open_store()?;
    let disks = s.disks()?;
    if json {
        return cx.print_json(&disks);
    }
    for d in disks {
        let size = std::fs::metadata(&d.image)
            .map(|m| human(m.len()))
            .unwrap_or_else(|_| "missing".into());
        cx.emit(format!("{}\t{}\t{}", d.name, size, d.image.display()))?;
    }
    Ok(())
}

pub(super) fn remove(cx: &mut Ctx<'_, impl Write>, name: &str) -> Result<()> {
    let s = cx.open_store()?;
    control::disk_remove(&s, name)?;
    cx.emit(format!("disk {name} removed (its image is untouched)"))
}
