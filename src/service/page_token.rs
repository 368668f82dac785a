//! Opaque page tokens: the keyset position of the next page, bound to the filters of the
//! list that issued it.
//!
//! Layout before base64url: version (1 byte) | last instance id (8, big endian) |
//! filter fingerprint (8) | check (4). The check detects tampering and truncation; it is
//! not a secret, since a token only positions a list the caller may already read.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

use crate::biz::{Error, InstanceId, ListFilter};

const VERSION: u8 = 1;
const LEN: usize = 1 + 8 + 8 + 4;

/// Encodes the position after `last` for `filter`.
pub fn encode(last: InstanceId, filter: &ListFilter) -> String {
    encode_raw(last.get(), fingerprint(filter))
}

/// Encodes the position after audit row `last` of `instance`'s trail.
pub fn encode_audit(last: i64, instance: InstanceId) -> String {
    encode_raw(last, audit_fingerprint(instance))
}

/// Decodes a token issued by [`encode_audit`] for `instance`; empty means the first page.
///
/// # Errors
/// `InvalidPageToken`.
pub fn decode_audit(token: &str, instance: InstanceId) -> Result<Option<i64>, Error> {
    decode_raw(token, audit_fingerprint(instance))
}

fn audit_fingerprint(instance: InstanceId) -> u64 {
    fnv1a(format!("audit\0{}", instance.get()).as_bytes())
}

fn encode_raw(last: i64, fp: u64) -> String {
    let mut buf = Vec::with_capacity(LEN);
    buf.push(VERSION);
    buf.extend_from_slice(&last.to_be_bytes());
    buf.extend_from_slice(&fp.to_be_bytes());
    let check = (fnv1a(&buf) >> 32) as u32;
    buf.extend_from_slice(&check.to_be_bytes());
    URL_SAFE_NO_PAD.encode(buf)
}

/// Decodes a token issued for `filter`; empty means the first page.
///
/// # Errors
/// `InvalidPageToken` when the token is malformed, tampered with, or was issued for
/// other filters.
pub fn decode(token: &str, filter: &ListFilter) -> Result<Option<InstanceId>, Error> {
    let malformed =
        || Error::InvalidPageToken { message: "not a page token issued by this service" };
    match decode_raw(token, fingerprint(filter))? {
        Some(last) => InstanceId::try_from(last).map(Some).map_err(|_| malformed()),
        None => Ok(None),
    }
}

fn decode_raw(token: &str, expected_fp: u64) -> Result<Option<i64>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    let malformed =
        || Error::InvalidPageToken { message: "not a page token issued by this service" };
    let buf = URL_SAFE_NO_PAD.decode(token).map_err(|_| malformed())?;
    if buf.len() != LEN || buf[0] != VERSION {
        return Err(malformed());
    }
    let (body, check) = buf.split_at(LEN - 4);
    if u32::from_be_bytes(check.try_into().expect("4 bytes")) != (fnv1a(body) >> 32) as u32 {
        return Err(malformed());
    }
    let last = i64::from_be_bytes(body[1..9].try_into().expect("8 bytes"));
    let fp = u64::from_be_bytes(body[9..17].try_into().expect("8 bytes"));
    if fp != expected_fp {
        return Err(Error::InvalidPageToken {
            message: "the token belongs to a list with other filters; start again without it",
        });
    }
    Ok(Some(last))
}

fn fingerprint(filter: &ListFilter) -> u64 {
    let mut bytes = Vec::new();
    for part in
        [filter.user_id.as_deref(), filter.status.map(|s| s.as_str()), filter.name.as_deref()]
    {
        push_part(&mut bytes, part);
    }
    // The filters of issue 16, appended only when present: a token issued without any of
    // them (before they existed) keeps its fingerprint. The selector is bound by its
    // canonical text, so `team = a` and `team=a` page alike.
    let gpu = filter.gpu.map(|g| g.code().to_string());
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true))
    };
    let extra = [
        filter.labels.as_ref().map(ToString::to_string),
        gpu,
        filter.image.clone(),
        time(filter.created_after),
        time(filter.created_before),
    ];
    if extra.iter().any(Option::is_some) {
        bytes.extend_from_slice(b"\0issue16");
        for part in &extra {
            push_part(&mut bytes, part.as_deref());
        }
    }
    fnv1a(&bytes)
}

/// One filter's part of the fingerprint: length-prefixed, so parts cannot run together.
fn push_part(bytes: &mut Vec<u8>, part: Option<&str>) {
    match part {
        Some(s) => {
            bytes.push(1);
            bytes.extend_from_slice(&(s.len() as u64).to_be_bytes());
            bytes.extend_from_slice(s.as_bytes());
        }
        None => bytes.push(0),
    }
}

/// FNV-1a, 64 bit: stable across releases and platforms, unlike `DefaultHasher`.
pub(super) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::biz::InstanceStatus;

    fn filter() -> ListFilter {
        ListFilter {
            user_id: Some("u1".into()),
            status: Some(InstanceStatus::Running),
            ..ListFilter::default()
        }
    }

    #[test]
    fn a_token_round_trips_under_the_same_filters() {
        let id = InstanceId::try_from(1_234_567_890).unwrap();

        let token = encode(id, &filter());

        assert_eq!(decode(&token, &filter()).unwrap(), Some(id));
        assert_eq!(decode("", &filter()).unwrap(), None);
    }

    #[test]
    fn a_token_is_refused_under_other_filters() {
        let token = encode(InstanceId::try_from(7).unwrap(), &filter());
        let other = ListFilter { name: Some("x".into()), ..filter() };

        let result = decode(&token, &other);

        assert!(matches!(result, Err(Error::InvalidPageToken { .. })));
    }

    #[test]
    fn every_filter_of_issue_16_is_bound() {
        use crate::biz::{GpuType, instance::LabelSelector};
        let token = encode(InstanceId::try_from(7).unwrap(), &filter());
        let selector = |s: &str| LabelSelector::parse(s).unwrap();
        let at = |s: i64| chrono::DateTime::from_timestamp(s, 0);
        let others = [
            ListFilter { labels: selector("team=a"), ..filter() },
            ListFilter { gpu: Some(GpuType::TeslaA100), ..filter() },
            ListFilter { gpu: Some(GpuType::None), ..filter() },
            ListFilter { image: Some("nginx".into()), ..filter() },
            ListFilter { created_after: at(1), ..filter() },
            ListFilter { created_before: at(1), ..filter() },
        ];
        for other in &others {
            assert!(matches!(decode(&token, other), Err(Error::InvalidPageToken { .. })));
            let theirs = encode(InstanceId::try_from(7).unwrap(), other);
            assert!(decode(&theirs, other).is_ok());
            for another in others.iter().filter(|a| *a != other) {
                assert!(decode(&theirs, another).is_err(), "{other:?} vs {another:?}");
            }
        }
        let spaced = ListFilter { labels: selector(" team = a "), ..filter() };
        let theirs = encode(InstanceId::try_from(7).unwrap(), &others[0]);
        assert!(decode(&theirs, &spaced).is_ok(), "one selector, two spellings");
    }

    #[test]
    fn forged_or_damaged_tokens_are_refused() {
        let token = encode(InstanceId::try_from(7).unwrap(), &filter());
        let mut flipped = token.clone().into_bytes();
        flipped[3] = if flipped[3] == b'A' { b'B' } else { b'A' };
        let forged = [
            "abc".to_owned(),
            "!!!!".to_owned(),
            token[..token.len() - 2].to_owned(),
            String::from_utf8(flipped).unwrap(),
            URL_SAFE_NO_PAD.encode([0u8; LEN]),
        ];
        for t in forged {
            assert!(matches!(decode(&t, &filter()), Err(Error::InvalidPageToken { .. })), "{t}");
        }
    }
}
