//! Names of reference points and disks: 1–64 of `[A-Za-z0-9._-]`, not starting with `.` or
//! `-`, not `live`. They become file and directory names, so nothing else is let through.

use crate::error::{Error, Result};

/// Check a reference point or disk name.
///
/// # Errors
/// `Error::BadName` saying which rule the name breaks.
pub fn validate(name: &str) -> Result<()> {
    let bad = |why| {
        Err(Error::BadName {
            name: name.to_string(),
            why,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > 64 {
        return bad("longer than 64 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("only letters, digits, '.', '_' and '-' are allowed");
    }
    if name.starts_with('.') || name.starts_with('-') {
        return bad("must not start with '.' or '-'");
    }
    if name == "live" {
        return bad("'live' is reserved for the live disks directory");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate;

    #[test]
    fn accepts_ordinary_names() {
        for n in [
            "a",
            "nightly-2026.11.25",
            "R_1",
            "x".repeat(64).as_str(),
            "live2",
        ] {
            validate(n).unwrap();
        }
    }

    #[test]
    fn refuses_bad_names() {
        for n in [
            "",
            "../x",
            "a/b",
            ".hidden",
            "-x",
            "live",
            "sp ace",
            "é",
            &"x".repeat(65),
        ] {
            assert!(validate(n).is_err(), "{n:?}");
        }
    }
}
