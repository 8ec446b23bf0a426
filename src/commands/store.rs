//! `init`, `status`, `mount`, `umount`.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{Ctx, human};
use crate::control;
use crate::error::Result;
use crate::store::{self, DEFAULT_BLOCK_SIZE, Store};

pub(super) fn init(cx: &mut Ctx<'_, impl Write>, block_size: Option<String>) -> Result<()> {
    let bs = match block_size.or(cx.config.block_size.clone()) {
        Some(s) => store::parse_block_size(&s)?,
        None => DEFAULT_BLOCK_SIZE,
    };
    let s = Store::init(&cx.root, bs)?;
    cx.emit(format!(
        "initialized store {} (block size {})",
        s.root().display(),
        human(bs as u64)
    ))
}

pub(super) fn status(cx: &mut Ctx<'_, impl Write>, json: bool) -> Result<()> {
    let s = cx.open_store()?;
    let st = control::status(&s)?;
    if json {
        return cx.print_json(&st);
    }
    cx.emit(format!("store:      {}", s.root().display()))?;
    cx.emit(format!("block size: {}", human(s.block_size() as u64)))?;
    cx.emit(format!(
        "points:     {} ({} restorable)",
        st.refs, st.restorable
    ))?;
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

pub(super) fn umount(cx: &mut Ctx<'_, impl Write>, mountpoint: &Path) -> Result<()> {
    let msg = crate::daemon::umount(mountpoint)?;
    cx.emit(msg)
}
