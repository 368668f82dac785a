//! Label selectors as the API accepts them in `labelSelector`, and field selectors as in
//! `fieldSelector`.
//!
//! Labels: `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)` and `k notin (a,b)`, joined by
//! commas; that is every form `kube`'s `Selector` writes. Fields: `path=v`, `path==v` and
//! `path!=v` joined by commas, where `path` is a dotted field path (`involvedObject.name`,
//! `metadata.namespace`, `status.phase`) and a missing field reads as empty.

use serde_json::Value;

/// One parsed `labelSelector`; empty matches everything.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Selector(Vec<Requirement>);

#[derive(Debug, Clone, PartialEq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl Selector {
    /// Parses a selector string.
    ///
    /// # Errors
    /// A message naming the term that is not one of the supported forms.
    pub(crate) fn parse(text: &str) -> Result<Selector, String> {
        split_terms(text).into_iter().map(parse_term).collect::<Result<_, _>>().map(Selector)
    }

    /// Whether the object's `metadata.labels` satisfy every requirement.
    pub(crate) fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let label = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|req| match req {
            Requirement::Equals(k, v) => label(k) == Some(v),
            Requirement::NotEquals(k, v) => label(k) != Some(v),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::Absent(k) => label(k).is_none(),
            Requirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
        })
    }
}

/// One parsed `fieldSelector`; empty matches everything.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// Parses a field selector string.
    ///
    /// # Errors
    /// A message naming the term that is not `path=value`, `path==value` or `path!=value`.
    pub(crate) fn parse(text: &str) -> Result<FieldSelector, String> {
        let term = |t: &str| {
            let (path, equal, value) = if let Some((p, v)) = t.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                (p, true, v)
            } else {
                return Err(format!(
                    "invalid selector: {t:?}; expected field=value or field!=value"
                ));
            };
            let path = path.trim();
            if !is_key(path) {
                return Err(format!("invalid field path {path:?}"));
            }
            Ok((path.to_string(), equal, value.trim().to_string()))
        };
        split_terms(text).into_iter().map(term).collect::<Result<_, _>>().map(FieldSelector)
    }

    /// Whether every term holds for `object` (a missing field is the empty string).
    pub(crate) fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(path, equal, value)| {
            let field = path.split('.').fold(object, |v, part| &v[part]);
            let text = match field {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            (text == *value) == *equal
        })
    }
}

/// Splits on the commas that are not inside a `( … )` value set.
fn split_terms(text: &str) -> Vec<&str> {
    let (mut terms, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&text[start..]);
    terms.into_iter().map(str::trim).filter(|t| !t.is_empty()).collect()
}

fn parse_term(term: &str) -> Result<Requirement, String> {
    let invalid = || format!("unable to parse requirement: {term:?}");
    let key = |k: &str| Some(k.trim().to_string()).filter(|k| is_key(k)).ok_or_else(invalid);
    if let Some((k, set)) = term.split_once(" notin ") {
        return Ok(Requirement::NotIn(key(k)?, value_set(set).ok_or_else(invalid)?));
    }
    if let Some((k, set)) = term.split_once(" in ") {
        return Ok(Requirement::In(key(k)?, value_set(set).ok_or_else(invalid)?));
    }
    if let Some((k, v)) = term.split_once("!=") {
        return Ok(Requirement::NotEquals(key(k)?, v.trim().to_string()));
    }
    if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(Requirement::Equals(key(k)?, v.trim().to_string()));
    }
    match term.strip_prefix('!') {
        Some(k) => Ok(Requirement::Absent(key(k)?)),
        None => Ok(Requirement::Exists(key(term)?)),
    }
}

fn is_key(k: &str) -> bool {
    !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

fn value_set(text: &str) -> Option<Vec<String>> {
    let inner = text.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some(inner.split(',').map(|v| v.trim().to_string()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_supported_form_matches_as_the_api_server_does() {
        let pod = json!({"metadata": {"labels": {"app": "web", "tier": "gpu"}}});
        let cases = [
            ("", true),
            ("app=web", true),
            ("app==web,tier=gpu", true),
            ("app=db", false),
            ("app!=db", true),
            ("tier", true),
            ("!tier", false),
            ("missing", false),
            ("app in (db, web),tier notin (cpu)", true),
            ("app notin (web)", false),
        ];

        for (text, expected) in cases {
            let selector = Selector::parse(text).expect(text);
            assert_eq!(selector.matches(&pod), expected, "{text}");
        }
    }

    #[test]
    fn field_selectors_match_dotted_paths() {
        let event = json!({"involvedObject": {"kind": "Pod", "name": "inst-1"}, "count": 2});
        let cases = [
            ("", true),
            ("involvedObject.name=inst-1,involvedObject.kind=Pod", true),
            ("involvedObject.name==inst-2", false),
            ("involvedObject.kind!=Service", true),
            ("count=2", true),
            ("involvedObject.uid=", true),
        ];

        for (text, expected) in cases {
            let selector = FieldSelector::parse(text).expect(text);
            assert_eq!(selector.matches(&event), expected, "{text}");
        }
        assert!(FieldSelector::parse("involvedObject.name").is_err());
    }

    #[test]
    fn a_malformed_term_is_rejected() {
        assert!(Selector::parse("app in web").is_err());
        assert!(Selector::parse("a b=c").is_err());
    }
}
