//! Instance labels and label selectors, in Kubernetes syntax and within its limits
//! (issue 16): what a label may be, how a selector is parsed, and how it matches.
//!
//! Pure values and functions over std only.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use super::Error;

/// An instance's labels, by key (ordered, so they render and compare deterministically).
pub type Labels = BTreeMap<String, String>;

/// Most labels one instance may carry.
pub const MAX_LABELS: usize = 64;
/// Longest label name (the part after the prefix), as in Kubernetes.
pub const MAX_LABEL_NAME_LEN: usize = 63;
/// Longest label value, as in Kubernetes.
pub const MAX_LABEL_VALUE_LEN: usize = 63;
/// Longest label key prefix. Kubernetes allows 253; ours keeps room for the suffix
/// `.labels.resource.io` a prefixed key gets on the Pod (see [`pod_label_key`]), so the
/// copied label is still a valid key.
pub const MAX_LABEL_PREFIX_LEN: usize = 253 - POD_LABEL_SUFFIX.len();
/// The service's own label domain: keys with this prefix (or a subdomain of it) are
/// refused on input.
pub const RESERVED_LABEL_DOMAIN: &str = "resource.io";
/// The prefix of user labels on Pods and Services: `team` is `labels.resource.io/team`.
pub const POD_LABEL_PREFIX: &str = "labels.resource.io";
/// What a user prefix is suffixed with on Pods: `example.com/team` is
/// `example.com.labels.resource.io/team`.
const POD_LABEL_SUFFIX: &str = ".labels.resource.io";

/// Longest label selector, in bytes.
pub const MAX_SELECTOR_LEN: usize = 4096;
/// Most requirements in one label selector.
pub const MAX_SELECTOR_REQUIREMENTS: usize = 32;
/// Most values in one `in` / `notin` set.
pub const MAX_SELECTOR_VALUES: usize = 64;

/// Checks `labels` against the Kubernetes label syntax, the reserved prefix and the
/// count limit.
///
/// # Errors
/// `InvalidLabels` naming the first offending key (or the count).
pub fn validate_labels(labels: &Labels) -> Result<(), Error> {
    if labels.len() > MAX_LABELS {
        return Err(Error::InvalidLabels {
            key: None,
            message: format!("at most {MAX_LABELS} labels are allowed, got {}", labels.len()),
        });
    }
    for (key, value) in labels {
        let bad = |message: String| Error::InvalidLabels { key: Some(clip(key)), message };
        check_key(key).map_err(|m| bad(format!("key {:?} {m}", clip(key))))?;
        if let Some(prefix) = key.split_once('/').map(|(p, _)| p)
            && is_reserved(prefix)
        {
            return Err(bad(format!(
                "key {key:?}: the prefix {RESERVED_LABEL_DOMAIN:?} and its subdomains are reserved"
            )));
        }
        check_value(value)
            .map_err(|m| bad(format!("value {:?} of key {key:?} {m}", clip(value))))?;
    }
    Ok(())
}

/// Whether a key prefix is the service's own (`resource.io`, `x.resource.io`).
fn is_reserved(prefix: &str) -> bool {
    prefix == RESERVED_LABEL_DOMAIN || prefix.ends_with(&format!(".{RESERVED_LABEL_DOMAIN}"))
}

/// What an error message shows of client text: at most 80 characters.
fn clip(s: &str) -> String {
    if s.chars().count() <= 80 {
        s.to_owned()
    } else {
        s.chars().take(80).collect::<String>() + "…"
    }
}

/// A label key: `[prefix/]name`. The `Err` says what is wrong, to follow the key.
fn check_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() {
            return Err("has an empty prefix before '/'".into());
        }
        if prefix.len() > MAX_LABEL_PREFIX_LEN {
            return Err(format!("has a prefix longer than {MAX_LABEL_PREFIX_LEN} characters"));
        }
        if !is_dns_subdomain(prefix) {
            return Err(
                "has a prefix that is not a lower-case DNS subdomain (e.g. example.com)".into()
            );
        }
    }
    if name.is_empty() {
        return Err("has an empty name".into());
    }
    if name.len() > MAX_LABEL_NAME_LEN {
        return Err(format!("has a name longer than {MAX_LABEL_NAME_LEN} characters"));
    }
    if !is_label_word(name) {
        return Err("has a name that is not alphanumeric at both ends with only '-', '_', '.' \
                    and alphanumerics between"
            .into());
    }
    Ok(())
}

/// A label value: empty, or like a name.
fn check_value(value: &str) -> Result<(), String> {
    if value.len() > MAX_LABEL_VALUE_LEN {
        return Err(format!("is longer than {MAX_LABEL_VALUE_LEN} characters"));
    }
    if !value.is_empty() && !is_label_word(value) {
        return Err("is not alphanumeric at both ends with only '-', '_', '.' and \
                    alphanumerics between"
            .into());
    }
    Ok(())
}

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`
fn is_label_word(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// RFC 1123 subdomain: dot-separated labels of `[a-z0-9]([-a-z0-9]*[a-z0-9])?`.
fn is_dns_subdomain(s: &str) -> bool {
    s.split('.').all(|part| {
        let b = part.as_bytes();
        !b.is_empty()
            && b.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
    })
}

/// The key a user label has on the instance's Pod and Service: `team` becomes
/// `labels.resource.io/team`, `example.com/team` becomes
/// `example.com.labels.resource.io/team` — a valid key either way, never one another
/// system uses, and two user keys never map to one.
pub fn pod_label_key(key: &str) -> String {
    match key.split_once('/') {
        Some((prefix, name)) => format!("{prefix}{POD_LABEL_SUFFIX}/{name}"),
        None => format!("{POD_LABEL_PREFIX}/{key}"),
    }
}

/// Whether `key`, a Pod or Service label, is a copied user label ([`pod_label_key`]).
pub fn is_pod_label_key(key: &str) -> bool {
    key.split_once('/')
        .is_some_and(|(prefix, _)| prefix == POD_LABEL_PREFIX || prefix.ends_with(POD_LABEL_SUFFIX))
}

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SelectorOp {
    /// `key=value` (or `key==value`): the label is there with this value.
    Equals(String),
    /// `key!=value`: the label is absent or has another value.
    NotEquals(String),
    /// `key in (a,b)`: the label is there with one of these values.
    In(BTreeSet<String>),
    /// `key notin (a,b)`: the label is absent or has none of these values.
    NotIn(BTreeSet<String>),
    /// `key`: the label is there.
    Exists,
    /// `!key`: the label is absent.
    DoesNotExist,
}

/// A requirement on one key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Requirement {
    /// The label key.
    pub key: String,
    /// What it must satisfy.
    pub op: SelectorOp,
}

/// A parsed Kubernetes label selector: every requirement must hold. Never empty (an
/// empty selector text is "no selector").
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LabelSelector {
    /// The requirements, in the order written.
    pub requirements: Vec<Requirement>,
}

// === impl Requirement ===

impl Requirement {
    /// Whether `labels` satisfy this requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match &self.op {
            SelectorOp::Equals(v) => value == Some(v),
            SelectorOp::NotEquals(v) => value != Some(v),
            SelectorOp::In(set) => value.is_some_and(|v| set.contains(v)),
            SelectorOp::NotIn(set) => !value.is_some_and(|v| set.contains(v)),
            SelectorOp::Exists => value.is_some(),
            SelectorOp::DoesNotExist => value.is_none(),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(",");
        match &self.op {
            SelectorOp::Equals(v) => write!(f, "{}={v}", self.key),
            SelectorOp::NotEquals(v) => write!(f, "{}!={v}", self.key),
            SelectorOp::In(s) => write!(f, "{} in ({})", self.key, set(s)),
            SelectorOp::NotIn(s) => write!(f, "{} notin ({})", self.key, set(s)),
            SelectorOp::Exists => f.write_str(&self.key),
            SelectorOp::DoesNotExist => write!(f, "!{}", self.key),
        }
    }
}

// === impl LabelSelector ===

impl LabelSelector {
    /// Parses the Kubernetes selector syntax: `team=a,env!=prod,tier in (web,api),
    /// tier notin (x),has-key,!no-key`. Whitespace around tokens is ignored. Empty (or
    /// blank) text is `None`: no selector.
    ///
    /// # Errors
    /// `InvalidLabelSelector` saying what and where, for malformed text, a key or value
    /// outside the label syntax, or a selector beyond [`MAX_SELECTOR_LEN`],
    /// [`MAX_SELECTOR_REQUIREMENTS`] or [`MAX_SELECTOR_VALUES`].
    pub fn parse(text: &str) -> Result<Option<LabelSelector>, Error> {
        let bad = |message: String| Error::InvalidLabelSelector { message };
        if text.len() > MAX_SELECTOR_LEN {
            return Err(bad(format!(
                "is {} bytes long; at most {MAX_SELECTOR_LEN} are allowed",
                text.len()
            )));
        }
        if text.trim().is_empty() {
            return Ok(None);
        }
        let mut requirements = Vec::new();
        for part in split_top_level(text).map_err(bad)? {
            if requirements.len() == MAX_SELECTOR_REQUIREMENTS {
                return Err(bad(format!("has more than {MAX_SELECTOR_REQUIREMENTS} requirements")));
            }
            requirements.push(parse_requirement(part.trim()).map_err(bad)?);
        }
        Ok(Some(LabelSelector { requirements }))
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

impl fmt::Display for LabelSelector {
    /// The canonical text: one spelling per selector (sets sorted, no spaces but around
    /// `in` / `notin`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// The requirements of `text`: split at commas outside parentheses.
fn split_top_level(text: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '(' => {
                depth += 1;
                if depth > 1 {
                    return Err(format!("has a nested '(' at byte {i}"));
                }
            }
            ')' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| format!("has a ')' without '(' at byte {i}"))?;
            }
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("has a '(' that is never closed".into());
    }
    parts.push(&text[start..]);
    Ok(parts)
}

fn parse_requirement(part: &str) -> Result<Requirement, String> {
    if part.is_empty() {
        return Err("has an empty requirement (two commas, or a comma at an end)".into());
    }
    if let Some(rest) = part.strip_prefix('!') {
        let key = selector_key(rest.trim())?;
        return Ok(Requirement { key, op: SelectorOp::DoesNotExist });
    }
    // `!=` before `=`, `==` before `=`.
    for (token, make) in [
        ("!=", SelectorOp::NotEquals as fn(String) -> SelectorOp),
        ("==", SelectorOp::Equals),
        ("=", SelectorOp::Equals),
    ] {
        if let Some((key, value)) = part.split_once(token) {
            let key = selector_key(key.trim())?;
            let value = selector_value(&key, value.trim())?;
            return Ok(Requirement { key, op: make(value) });
        }
    }
    // `key in (…)`, `key notin (…)`: the key ends at the first whitespace or '('.
    if let Some(open) = part.find('(') {
        let head = part[..open].trim_end();
        let (key, op) = head
            .rsplit_once(char::is_whitespace)
            .map(|(k, op)| (k.trim(), op))
            .ok_or_else(|| format!("{part:?} is not a requirement: expected `key in (a,b)`"))?;
        let key = selector_key(key)?;
        let body = part[open + 1..]
            .strip_suffix(')')
            .ok_or_else(|| format!("{part:?} has text after its ')'"))?;
        let mut values = BTreeSet::new();
        for (n, v) in body.split(',').enumerate() {
            if n == MAX_SELECTOR_VALUES {
                return Err(format!(
                    "the set of {key:?} has more than {MAX_SELECTOR_VALUES} values"
                ));
            }
            values.insert(selector_value(&key, v.trim())?);
        }
        if body.trim().is_empty() {
            return Err(format!("the set of {key:?} is empty"));
        }
        return match op {
            "in" => Ok(Requirement { key, op: SelectorOp::In(values) }),
            "notin" => Ok(Requirement { key, op: SelectorOp::NotIn(values) }),
            other => Err(format!("{other:?} is no operator; expected in or notin")),
        };
    }
    if part.contains(char::is_whitespace) || part.contains(['<', '>']) {
        return Err(format!(
            "{part:?} is not a requirement: expected key=value, key!=value, key in (a,b), \
             key notin (a,b), key or !key"
        ));
    }
    Ok(Requirement { key: selector_key(part)?, op: SelectorOp::Exists })
}

fn selector_key(key: &str) -> Result<String, String> {
    check_key(key).map_err(|m| format!("key {:?} {m}", clip(key)))?;
    Ok(key.to_owned())
}

fn selector_value(key: &str, value: &str) -> Result<String, String> {
    check_value(value).map_err(|m| format!("value {:?} of key {key:?} {m}", clip(value)))?;
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn key_error(l: &Labels) -> Option<String> {
        match validate_labels(l) {
            Err(Error::InvalidLabels { key, .. }) => key,
            other => panic!("expected InvalidLabels, got {other:?}"),
        }
    }

    #[test]
    fn kubernetes_label_keys_and_values_are_accepted() {
        let ok = labels(&[
            ("team", "a"),
            ("app.kubernetes.io/name", "web-1"),
            ("example.com/tier", ""),
            ("a", "A.b_c-9"),
            (&"k".repeat(63), &"v".repeat(63)),
        ]);

        assert!(validate_labels(&ok).is_ok());
        assert!(validate_labels(&Labels::new()).is_ok());
    }

    #[test]
    fn malformed_keys_are_refused_naming_the_key() {
        for key in [
            "",
            "-team",
            "team-",
            "te am",
            "/name",
            "prefix/",
            "Upper.Case/name",
            "a/b/c",
            "ex_ample.com/name",
            &"k".repeat(64),
            &format!("{}/n", "p".repeat(MAX_LABEL_PREFIX_LEN + 1)),
        ] {
            let l = labels(&[(key, "v")]);
            assert_eq!(key_error(&l).as_deref(), Some(clip(key).as_str()), "{key:?}");
        }
    }

    #[test]
    fn malformed_values_are_refused_naming_the_key() {
        for value in ["-a", "a-", "a b", "é", &"v".repeat(64)] {
            let l = labels(&[("team", value)]);
            assert_eq!(key_error(&l).as_deref(), Some("team"), "{value:?}");
        }
    }

    #[test]
    fn our_own_prefix_is_reserved() {
        for key in ["resource.io/instance-id", "labels.resource.io/team", "x.resource.io/y"] {
            let result = validate_labels(&labels(&[(key, "v")]));
            assert!(
                matches!(&result, Err(Error::InvalidLabels { message, .. }) if message.contains("reserved")),
                "{key}: {result:?}"
            );
        }
        assert!(validate_labels(&labels(&[("notresource.io/x", "v")])).is_ok());
    }

    #[test]
    fn at_most_64_labels() {
        let many: Labels = (0..=MAX_LABELS).map(|i| (format!("k{i}"), "v".to_owned())).collect();
        let enough: Labels = many.clone().into_iter().take(MAX_LABELS).collect();

        assert!(validate_labels(&enough).is_ok());
        assert!(matches!(validate_labels(&many), Err(Error::InvalidLabels { key: None, .. })));
    }

    #[test]
    fn pod_label_keys_are_valid_distinct_and_ours() {
        assert_eq!(pod_label_key("team"), "labels.resource.io/team");
        assert_eq!(pod_label_key("example.com/team"), "example.com.labels.resource.io/team");
        // Four DNS labels, 234 characters in all.
        let prefix = [63, 63, 63, 42].map(|n| "p".repeat(n)).join(".");
        assert_eq!(prefix.len(), MAX_LABEL_PREFIX_LEN);
        let longest = format!("{prefix}/{}", "n".repeat(63));
        assert!(validate_labels(&labels(&[(&longest, "v")])).is_ok());
        let mapped = pod_label_key(&longest);
        // Valid for Kubernetes (a prefix of at most 253, where ours stops at 234).
        let (mapped_prefix, mapped_name) = mapped.split_once('/').unwrap();
        assert!(mapped_prefix.len() <= 253 && is_dns_subdomain(mapped_prefix), "{mapped}");
        assert!(mapped_name.len() <= 63 && is_label_word(mapped_name));
        assert!(is_pod_label_key(&mapped) && is_pod_label_key("labels.resource.io/team"));
        assert!(!is_pod_label_key("resource.io/instance-id") && !is_pod_label_key("team"));
    }

    fn parse(text: &str) -> LabelSelector {
        LabelSelector::parse(text).unwrap().expect("a selector")
    }

    fn parse_error(text: &str) -> String {
        match LabelSelector::parse(text) {
            Err(Error::InvalidLabelSelector { message }) => message,
            other => panic!("{text:?}: expected InvalidLabelSelector, got {other:?}"),
        }
    }

    #[test]
    fn every_form_of_the_kubernetes_syntax_parses() {
        let s = parse(
            " team = a , env!=prod,x==y, tier in (web, api) ,tier notin (x),has-key, ! no-key,e=",
        );

        let ops: Vec<SelectorOp> = s.requirements.iter().map(|r| r.op.clone()).collect();
        let set = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<_>>();
        assert_eq!(
            ops,
            vec![
                SelectorOp::Equals("a".into()),
                SelectorOp::NotEquals("prod".into()),
                SelectorOp::Equals("y".into()),
                SelectorOp::In(set(&["web", "api"])),
                SelectorOp::NotIn(set(&["x"])),
                SelectorOp::Exists,
                SelectorOp::DoesNotExist,
                SelectorOp::Equals(String::new()),
            ]
        );
        assert_eq!(s.requirements[6].key, "no-key");
        assert_eq!(
            s.to_string(),
            "team=a,env!=prod,x=y,tier in (api,web),tier notin (x),has-key,!no-key,e="
        );
        assert_eq!(parse(&s.to_string()), s, "the canonical text parses to the same selector");
        assert_eq!(LabelSelector::parse("  ").unwrap(), None);
    }

    #[test]
    fn malformed_selectors_say_what_is_wrong() {
        for (text, says) in [
            ("team=a,", "empty requirement"),
            (",team", "empty requirement"),
            ("team in (a", "never closed"),
            ("team in a)", "without '('"),
            ("team in ((a))", "nested"),
            ("team in ()", "empty"),
            ("team oneof (a)", "no operator"),
            ("team in (a) x", "after its ')'"),
            ("te am", "not a requirement"),
            ("team>3", "not a requirement"),
            ("-bad=a", "key \"-bad\""),
            ("team=-bad", "value \"-bad\""),
            ("!", "empty name"),
        ] {
            let message = parse_error(text);
            assert!(message.contains(says), "{text:?}: {message}");
        }
    }

    #[test]
    fn selectors_are_bounded() {
        let long = format!("k={}", "v".repeat(MAX_SELECTOR_LEN));
        assert!(parse_error(&long).contains("4096"));
        let many = (0..=MAX_SELECTOR_REQUIREMENTS).map(|i| format!("k{i}")).collect::<Vec<_>>();
        assert!(parse_error(&many.join(",")).contains("32 requirements"));
        assert_eq!(parse(&many[..MAX_SELECTOR_REQUIREMENTS].join(",")).requirements.len(), 32);
        let values = (0..=MAX_SELECTOR_VALUES).map(|i| format!("v{i}")).collect::<Vec<_>>();
        assert!(parse_error(&format!("k in ({})", values.join(","))).contains("64 values"));
        assert!(LabelSelector::parse(&format!("k in ({})", values[..64].join(","))).is_ok());
    }

    #[test]
    fn requirements_match_as_in_kubernetes() {
        let l = labels(&[("team", "a"), ("env", "prod"), ("empty", "")]);
        let cases = [
            ("team=a", true),
            ("team=b", false),
            ("team!=b", true),
            ("team!=a", false),
            ("missing!=a", true),
            ("team in (a,b)", true),
            ("team in (b,c)", false),
            ("missing in (a)", false),
            ("team notin (b)", true),
            ("team notin (a)", false),
            ("missing notin (a)", true),
            ("team", true),
            ("missing", false),
            ("!missing", true),
            ("!team", false),
            ("empty=", true),
            ("empty", true),
            ("team=a,env=prod", true),
            ("team=a,env!=prod", false),
        ];
        for (text, want) in cases {
            assert_eq!(parse(text).matches(&l), want, "{text}");
        }
    }
}
