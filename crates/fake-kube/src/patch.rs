//! The three patch flavours the API accepts, on plain JSON values.
//!
//! Pure functions over `serde_json::Value`; the store decides what a result may change.

use serde_json::{Map, Value};

/// Applies an RFC 7386 JSON merge patch: objects merge recursively, `null` removes a key,
/// anything else (arrays included) replaces.
pub(crate) fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(out) = target {
        for (key, value) in fields {
            if value.is_null() {
                out.remove(key);
            } else {
                merge(out.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// Applies an RFC 6902 JSON patch (`add`, `remove`, `replace`, `test`; not `copy`, `move`).
///
/// # Errors
/// A message naming the first operation that is malformed, points nowhere or fails its test.
pub(crate) fn json_patch(mut doc: Value, ops: &Value) -> Result<Value, String> {
    let ops = ops.as_array().ok_or("a JSON patch must be an array of operations")?;
    for op in ops {
        let name = op["op"].as_str().ok_or("an operation needs \"op\"")?;
        let path = op["path"].as_str().ok_or("an operation needs \"path\"")?;
        match name {
            "add" => add(&mut doc, path, value_of(op)?)?,
            "remove" => drop(remove(&mut doc, path)?),
            "replace" => {
                remove(&mut doc, path)?;
                add(&mut doc, path, value_of(op)?)?;
            }
            "test" if doc.pointer(path) == Some(value_of(op)?) => {}
            "test" => return Err(format!("test failed at {path}")),
            other => return Err(format!("unknown operation {other:?}")),
        }
    }
    Ok(doc)
}

fn value_of(op: &Value) -> Result<&Value, String> {
    op.get("value").ok_or_else(|| format!("{} needs \"value\"", op["op"]))
}

/// Splits a JSON pointer into its parent pointer and unescaped last token.
fn split_pointer(path: &str) -> Result<(&str, String), String> {
    let at = path.rfind('/').ok_or(format!("{path:?} is not a JSON pointer"))?;
    Ok((&path[..at], path[at + 1..].replace("~1", "/").replace("~0", "~")))
}

fn add(doc: &mut Value, path: &str, value: &Value) -> Result<(), String> {
    if path.is_empty() {
        *doc = value.clone();
        return Ok(());
    }
    let (parent, token) = split_pointer(path)?;
    match doc.pointer_mut(parent) {
        Some(Value::Object(map)) => {
            map.insert(token, value.clone());
        }
        Some(Value::Array(items)) => {
            let at = if token == "-" { items.len() } else { index(&token, items.len() + 1)? };
            items.insert(at, value.clone());
        }
        _ => return Err(format!("no object or array at {parent:?}")),
    }
    Ok(())
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, token) = split_pointer(path)?;
    let removed = match doc.pointer_mut(parent) {
        Some(Value::Object(map)) => map.remove(&token),
        Some(Value::Array(items)) => {
            let at = index(&token, items.len())?;
            Some(items.remove(at))
        }
        _ => None,
    };
    removed.ok_or(format!("no value at {path:?}"))
}

fn index(token: &str, bound: usize) -> Result<usize, String> {
    token.parse().ok().filter(|i| *i < bound).ok_or(format!("index {token:?} is out of range"))
}

/// Simplified server-side apply (see the crate docs): labels and annotations merge,
/// finalizers unite, other applied top-level fields replace, `status` is never applied.
pub(crate) fn apply(old: &Value, applied: &Value) -> Value {
    let mut out = old.clone();
    for (key, value) in applied.as_object().into_iter().flatten() {
        match key.as_str() {
            "status" | "kind" | "apiVersion" => {}
            "metadata" => apply_metadata(&mut out["metadata"], value),
            _ => out[key] = value.clone(),
        }
    }
    out
}

fn apply_metadata(meta: &mut Value, applied: &Value) {
    for (key, value) in applied.as_object().into_iter().flatten() {
        match key.as_str() {
            "labels" | "annotations" => merge(&mut meta[key], value),
            "finalizers" => {
                let mut all = meta[key].as_array().cloned().unwrap_or_default();
                for f in value.as_array().into_iter().flatten() {
                    if !all.contains(f) {
                        all.push(f.clone());
                    }
                }
                meta[key] = Value::Array(all);
            }
            // Kept so a stale version in the applied object is a conflict, as on a cluster.
            "resourceVersion" | "ownerReferences" => meta[key] = value.clone(),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_merge_patch_with_null_removes_and_objects_merge() {
        let mut doc = json!({"a": {"b": 1, "c": 2}, "d": [1, 2]});

        merge(&mut doc, &json!({"a": {"b": null, "e": 3}, "d": [3]}));

        assert_eq!(doc, json!({"a": {"c": 2, "e": 3}, "d": [3]}));
    }

    #[test]
    fn a_json_patch_edits_arrays_and_checks_tests() {
        let doc = json!({"metadata": {"finalizers": ["a", "b"]}});
        let ops = json!([
            {"op": "test", "path": "/metadata/finalizers/0", "value": "a"},
            {"op": "remove", "path": "/metadata/finalizers/0"},
            {"op": "add", "path": "/metadata/finalizers/-", "value": "c"},
            {"op": "replace", "path": "/metadata/finalizers/0", "value": "x~y"},
            {"op": "add", "path": "/metadata/labels", "value": {"a/b": "1"}},
            {"op": "remove", "path": "/metadata/labels/a~1b"}
        ]);

        let out = json_patch(doc, &ops);

        let expected = json!({"metadata": {"finalizers": ["x~y", "c"], "labels": {}}});
        assert_eq!(out, Ok(expected));
    }

    #[test]
    fn a_failing_json_patch_test_is_an_error() {
        let ops = json!([{"op": "test", "path": "/a", "value": 2}]);

        assert!(json_patch(json!({"a": 1}), &ops).is_err());
    }

    #[test]
    fn apply_merges_labels_unites_finalizers_and_replaces_spec() {
        let old = json!({"metadata": {"labels": {"a": "1"}, "finalizers": ["f"]},
                         "spec": {"x": 1, "y": 2}, "status": {"phase": "Running"}});
        let applied = json!({"metadata": {"labels": {"b": "2"}, "finalizers": ["f", "g"]},
                             "spec": {"x": 3}, "status": {"phase": "Failed"}});

        let out = apply(&old, &applied);

        assert_eq!(
            out["metadata"],
            json!({"labels": {"a": "1", "b": "2"}, "finalizers": ["f", "g"]})
        );
        assert_eq!(out["spec"], json!({"x": 3}));
        assert_eq!(out["status"], json!({"phase": "Running"}));
    }
}
