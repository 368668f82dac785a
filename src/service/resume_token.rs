//! Opaque resume tokens of WatchResources: a position in the change log.
//!
//! Layout before base64url: version (1 byte) | tick (8, big endian) | seq (8) | check
//! (4). The check detects tampering and truncation; it is not a secret, since a token
//! only positions a watch of what the caller may already see.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

use super::page_token::fnv1a;
use crate::biz::{Error, watch::Position};

const VERSION: u8 = 0x57;
const LEN: usize = 1 + 8 + 8 + 4;

/// Encodes `position`.
pub fn encode(position: Position) -> String {
    let mut buf = Vec::with_capacity(LEN);
    buf.push(VERSION);
    buf.extend_from_slice(&position.tick.to_be_bytes());
    buf.extend_from_slice(&position.seq.to_be_bytes());
    let check = (fnv1a(&buf) >> 32) as u32;
    buf.extend_from_slice(&check.to_be_bytes());
    URL_SAFE_NO_PAD.encode(buf)
}

/// Decodes a token issued by [`encode`]; empty means "from now".
///
/// # Errors
/// `InvalidArgument` when the token is malformed or tampered with.
pub fn decode(token: &str) -> Result<Option<Position>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    let malformed = || Error::invalid("resume_token", "not a resume token issued by this service");
    let buf = URL_SAFE_NO_PAD.decode(token).map_err(|_| malformed())?;
    if buf.len() != LEN || buf[0] != VERSION {
        return Err(malformed());
    }
    let (body, check) = buf.split_at(LEN - 4);
    if check != ((fnv1a(body) >> 32) as u32).to_be_bytes() {
        return Err(malformed());
    }
    let word = |at: usize| {
        i64::from_be_bytes(body[at..at + 8].try_into().expect("8 bytes by the length check"))
    };
    let position = Position { tick: word(1), seq: word(9) };
    if position.tick < 0 || position.seq < 0 {
        return Err(malformed());
    }
    Ok(Some(position))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_it_did_not_issue() {
        for p in [Position { tick: 0, seq: 0 }, Position { tick: 7, seq: 42 }, Position::end_of(9)]
        {
            assert_eq!(decode(&encode(p)).unwrap(), Some(p));
        }
        assert_eq!(decode("").unwrap(), None);
        let token = encode(Position { tick: 3, seq: 4 });
        let mut raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
        raw[8] ^= 1;
        for bad in
            [URL_SAFE_NO_PAD.encode(&raw), token[..10].to_owned(), "!!".into(), "AAAA".into()]
        {
            let e = decode(&bad).unwrap_err();
            assert_eq!(e.reason(), "INVALID_ARGUMENT", "{bad}");
        }
    }
}
