//! Resume tokens: what `receive` prints when a transfer stops short and `send --resume` takes
//! to continue it. `vmref1-<hex of JSON>-<crc32c hex>`: readable by a person, and an altered
//! token fails its checksum (the sender then also checks every field against its own points).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

const PREFIX: &str = "vmref1-";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeToken {
    /// The sending store's id.
    pub store: String,
    pub point: String,
    pub point_id: String,
    pub base: Option<String>,
    pub base_id: Option<String>,
    /// Continue at this disk index and block.
    pub disk: u32,
    pub block: u64,
}

impl ResumeToken {
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).expect("tokens serialize");
        let hex: String = json.iter().map(|b| format!("{b:02x}")).collect();
        format!("{PREFIX}{hex}-{:08x}", crc32c::crc32c(&json))
    }

    /// # Errors
    /// `BadArgument` for anything that is not an unaltered token.
    pub fn decode(s: &str) -> Result<ResumeToken> {
        let bad =
            || Error::BadArgument(format!("resume token {s:?} is not valid (altered or cut)"));
        let body = s.trim().strip_prefix(PREFIX).ok_or_else(bad)?;
        let (hex, crc) = body.rsplit_once('-').ok_or_else(bad)?;
        if hex.len() % 2 != 0 || !hex.is_ascii() {
            return Err(bad());
        }
        let json: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad())?;
        let crc = u32::from_str_radix(crc, 16).map_err(|_| bad())?;
        if crc32c::crc32c(&json) != crc {
            return Err(bad());
        }
        serde_json::from_slice(&json).map_err(|_| bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_alterations_fail() {
        let t = ResumeToken {
            store: "s".into(),
            point: "p".into(),
            point_id: "id".into(),
            base: None,
            base_id: None,
            disk: 1,
            block: 77,
        };
        let s = t.encode();
        assert_eq!(ResumeToken::decode(&s).unwrap(), t);
        for i in PREFIX.len()..s.len() {
            let mut b = s.clone().into_bytes();
            b[i] = if b[i] == b'0' { b'1' } else { b'0' };
            if b == s.as_bytes() {
                continue;
            }
            let a = String::from_utf8(b).unwrap();
            assert!(ResumeToken::decode(&a).is_err(), "{a}");
        }
        assert!(ResumeToken::decode("vmref1-").is_err());
        assert!(ResumeToken::decode("").is_err());
    }
}
