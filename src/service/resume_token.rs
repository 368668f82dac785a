//! Opaque resume tokens of WatchResources: a position in a change log.
//!
//! Layout before base64url: version (1 byte) | epoch of the log (8, big endian) | tick
//! (8) | seq (8) | check (4). The check detects tampering and truncation; it is not a secret, since a token
//! only positions a watch of what the caller may already see.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

use super::page_token::fnv1a;
use crate::biz::{
    Error,
    watch::{Position, Resume},
};

const VERSION: u8 = 0x58;
const LEN: usize = 1 + 8 + 8 + 8 + 4;

/// Encodes `position` in the log `epoch`.
pub fn encode(epoch: i64, position: Position) -> String {
    let mut buf = Vec::with_capacity(LEN);
    buf.push(VERSION);
    buf.extend_from_slice(&epoch.to_be_bytes());
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
pub fn decode(token: &str) -> Result<Option<Resume>, Error> {
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
    let position = Position { tick: word(9), seq: word(17) };
    if position.tick < 0 || position.seq < 0 {
        return Err(malformed());
    }
    Ok(Some(Resume { epoch: word(1), position }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_it_did_not_issue() {
        for p in [Position { tick: 0, seq: 0 }, Position { tick: 7, seq: 42 }, Position::end_of(9)]
        {
            for epoch in [0, -5, i64::MAX] {
                assert_eq!(decode(&encode(epoch, p)).unwrap(), Some(Resume { epoch, position: p }));
            }
        }
        assert_eq!(decode("").unwrap(), None);
        let token = encode(11, Position { tick: 3, seq: 4 });
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
