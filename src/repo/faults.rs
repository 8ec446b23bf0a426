//! Injected read failures, for the tests that prove a failing disk under the repository gives
//! EIO to every reader (mount, restore, verify), never other bytes (tests/io_errors.rs).
//!
//! `VMREF_TEST_READ_EIO=KIND:N` makes the Nth blob read (counted from 1, per process) of KIND
//! (`data`, `map` or `any`) fail with EIO before its pack is touched, as a bad sector would;
//! `KIND:N+` makes that read and every later one of KIND fail, as a dead disk would. The
//! failure takes the path a real one takes: `Error::Io` carrying the OS error EIO.
//!
//! A hook rather than device-mapper: dm-flakey and dm-error would fail the real reads of a
//! loop device, but they need the kernel's device-mapper, which the machines the suite runs
//! on (containers, VMs without `/dev/mapper/control` or the dm modules) do not always offer.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::repo::BlobKind;

struct Spec {
    kind: Option<BlobKind>,
    nth: u64,
    and_later: bool,
}

fn parse(v: &str) -> Option<Spec> {
    let (kind, n) = v.split_once(':')?;
    let kind = match kind {
        "data" => Some(BlobKind::Data),
        "map" => Some(BlobKind::Map),
        "any" => None,
        _ => return None,
    };
    let (n, and_later) = match n.strip_suffix('+') {
        Some(n) => (n, true),
        None => (n, false),
    };
    Some(Spec {
        kind,
        nth: n.parse().ok().filter(|&n| n > 0)?,
        and_later,
    })
}

fn spec() -> Option<&'static Spec> {
    static SPEC: OnceLock<Option<Spec>> = OnceLock::new();
    SPEC.get_or_init(|| {
        let v = std::env::var("VMREF_TEST_READ_EIO").ok()?;
        let s = parse(&v);
        if s.is_none() {
            log::warn!("VMREF_TEST_READ_EIO={v:?} is not KIND:N[+]; no reads fail");
        }
        s
    })
    .as_ref()
}

/// Count a read of a `kind` blob from `object`; the injected failure when it is due.
///
/// # Errors
/// `Io` with EIO for the read `VMREF_TEST_READ_EIO` names.
pub(crate) fn before_read(kind: BlobKind, object: &str) -> Result<()> {
    let Some(s) = spec() else { return Ok(()) };
    if s.kind.is_some_and(|k| k != kind) {
        return Ok(());
    }
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let n = COUNT.fetch_add(1, Ordering::Relaxed) + 1;
    if n == s.nth || (s.and_later && n > s.nth) {
        log::debug!("injected EIO on {kind:?} read {n} of {object}");
        return Err(Error::io("read", object)(
            std::io::Error::from_raw_os_error(libc::EIO),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_garbage_is_refused() {
        let s = parse("map:3").unwrap();
        assert!(s.kind == Some(BlobKind::Map) && s.nth == 3 && !s.and_later);
        let s = parse("any:1+").unwrap();
        assert!(s.kind.is_none() && s.nth == 1 && s.and_later);
        for bad in ["", "map", "map:", "map:0", "disk:1", "data:x", "data:-1"] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }
}
