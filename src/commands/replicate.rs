//! `send`, `receive`, `replica list|promote|forget`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use super::{Ctx, human};
use crate::control;
use crate::error::{Error, Result};
use crate::replicate::receive::ReceiveArgs;
use crate::replicate::replica::ApplyReport;
use crate::replicate::send::SendArgs;
use crate::store::atomic::TempFile;

pub(super) fn send(
    cx: &mut Ctx<'_, impl Write>,
    args: &SendArgs,
    output: Option<&Path>,
) -> Result<()> {
    let s = cx.open_store()?;
    match output {
        Some(path) => {
            // Whole or not at all: a cut stream file would only fail later, at the receiver.
            let tmp = TempFile::new(path)?;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, tmp.file());
            control::send(&s, args, &mut w)?;
            w.flush().map_err(Error::io("write", tmp.path()))?;
            drop(w);
            tmp.commit()
        }
        None => {
            if std::io::stdout().is_terminal() {
                return Err(Error::BadArgument(
                    "refusing to write a stream to a terminal: pipe it (`| vmref receive`) or use --output FILE"
                        .into(),
                ));
            }
            control::send(&s, args, cx.out)?;
            Ok(())
        }
    }
}

fn parse_apply(a: &str) -> Result<(String, PathBuf)> {
    match a.split_once('=') {
        Some((d, img)) if !d.is_empty() && !img.is_empty() => Ok((
            d.to_string(),
            std::path::absolute(img).map_err(Error::io("resolve", img))?,
        )),
        _ => Err(Error::BadArgument(format!(
            "--apply {a:?}: want DISK=IMAGE, e.g. disk0=/srv/replica/disk0.img"
        ))),
    }
}

pub(super) fn receive(
    cx: &mut Ctx<'_, impl Write>,
    input: Option<&Path>,
    apply: &[String],
    abort: bool,
    json: bool,
) -> Result<()> {
    let s = cx.open_store()?;
    if abort {
        let r = control::receive_abort(&s)?;
        if json {
            return cx.print_json(&r);
        }
        emit_finished(cx, &r.finished)?;
        return match r.discarded {
            Some(p) => cx.emit(format!(
                "discarded the partial receive of point {p} ({} freed)",
                human(r.freed_bytes)
            )),
            None if r.finished.is_empty() => cx.emit("nothing to abort"),
            None => Ok(()),
        };
    }
    let args = ReceiveArgs {
        apply: apply
            .iter()
            .map(|a| parse_apply(a))
            .collect::<Result<_>>()?,
    };
    let r = match input {
        Some(p) => {
            let f = std::fs::File::open(p).map_err(Error::io("open", p))?;
            control::receive(
                &s,
                &args,
                &mut std::io::BufReader::with_capacity(1 << 20, f),
            )?
        }
        None => {
            if std::io::stdin().is_terminal() {
                return Err(Error::BadArgument(
                    "refusing to read a stream from a terminal: pipe one in (`vmref send ... |`) or use --input FILE"
                        .into(),
                ));
            }
            control::receive(&s, &args, &mut std::io::stdin().lock())?
        }
    };
    if json {
        return cx.print_json(&r);
    }
    emit_finished(cx, &r.finished)?;
    cx.emit(format!(
        "received {}{}{}: {} blocks, {} stream, {} stored",
        r.point,
        r.base
            .as_ref()
            .map(|b| format!(" since {b}"))
            .unwrap_or_default(),
        if r.resumed { " (resumed)" } else { "" },
        r.blocks,
        human(r.stream_bytes),
        human(r.stored_bytes)
    ))?;
    for a in &r.applied {
        cx.emit(format!(
            "replica {} of disk {} is at {} ({})",
            a.image.display(),
            a.disk,
            a.point,
            if a.whole {
                "written whole".to_string()
            } else {
                format!("{} blocks written in place", a.blocks)
            }
        ))?;
    }
    Ok(())
}

pub(super) fn replica_list(cx: &mut Ctx<'_, impl Write>, json: bool) -> Result<()> {
    let s = cx.open_store()?;
    let v = s.replicas()?;
    if json {
        return cx.print_json(&v);
    }
    if v.is_empty() {
        return cx.emit("no replicas");
    }
    for r in v {
        cx.emit(format!(
            "{}\t{}\t{}{}",
            r.disk,
            r.image.display(),
            r.point,
            r.applying
                .map(|a| format!(
                    " (apply to {} interrupted: run `vmref receive --abort`)",
                    a.point
                ))
                .unwrap_or_default()
        ))?;
    }
    Ok(())
}

pub(super) fn replica_promote(cx: &mut Ctx<'_, impl Write>, disks: &[String]) -> Result<()> {
    let s = cx.open_store()?;
    for d in disks {
        let rec = control::replica_promote(&s, d)?;
        cx.emit(format!(
            "disk {} is live on {}, tracking from the received point it holds",
            rec.name,
            rec.image.display()
        ))?;
    }
    Ok(())
}

pub(super) fn replica_forget(cx: &mut Ctx<'_, impl Write>, disk: &str) -> Result<()> {
    let s = cx.open_store()?;
    control::replica_forget(&s, disk)?;
    cx.emit(format!("no longer keeping a replica of disk {disk}"))
}

/// One line for each interrupted apply a command finished first.
fn emit_finished(cx: &mut Ctx<'_, impl Write>, done: &[ApplyReport]) -> Result<()> {
    for f in done {
        cx.emit(format!(
            "finished the interrupted apply of point {} to {} (disk {})",
            f.point,
            f.image.display(),
            f.disk
        ))?;
    }
    Ok(())
}
