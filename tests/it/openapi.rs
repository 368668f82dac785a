//! `GET /openapi.json` against the running service: every documented route is served,
//! and Schemathesis (PyPI, installed by `scripts/schemathesis.sh`) finds no 5xx and no
//! response the document does not describe.

use std::{path::PathBuf, process::Stdio};

use serde_json::json;

use crate::helpers::{repo_path, spawn_app};

#[tokio::test]
async fn every_documented_route_is_served_as_documented() {
    let app = spawn_app().await;
    let (status, doc) = app.get_json("/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");

    let create = json!({"name": "doc", "user_id": "u1",
                        "spec": {"cpu": 1, "memory": 256, "image": "nginx:1.25"}});

    let mut answered = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (verb, operation) in item.as_object().unwrap() {
            // A fresh instance for each call, so that a delete does not spoil a start.
            let created = app.create_at(&app.http, &create).await;
            let id = created["instance_id"].as_str().expect("an id");
            // Another owner's quota: setting u1's would refuse the next create.
            let path_with_values =
                path.replace("{instance_id}", id).replace("{name}", "x").replace("{user_id}", "u2");
            let url = format!("{}{path_with_values}", app.http);
            let method = reqwest::Method::from_bytes(verb.to_uppercase().as_bytes()).unwrap();
            let mut req = app.client.request(method, &url);
            if operation.get("requestBody").is_some() {
                // A quota's body takes only limits (it refuses other fields).
                let body = if path.starts_with("/v1/quotas/") {
                    json!({"cpu": 2})
                } else if path.ends_with("/labels") {
                    // The labels' body is the labels.
                    json!({"team": "a"})
                } else {
                    json!({"name": "doc", "spec": {"cpu": 1, "memory": 256, "image": "nginx:1.25"},
                           "cpu": 2, "memory": 512, "image": "nginx:1.26"})
                };
                req = req.json(&body);
            }
            let response = req.send().await.unwrap();
            let status = response.status().as_u16().to_string();
            let declared = operation["responses"].as_object().unwrap();
            assert!(declared.contains_key(&status), "{verb} {path}: {status} is not documented");
            assert!(
                status.starts_with('2'),
                "{verb} {path} answered {status}: {}",
                response.text().await.unwrap()
            );
            answered += 1;
        }
    }
    assert_eq!(answered, 18, "every route of the document was exercised");
}

/// The Schemathesis `st` command: `$SCHEMATHESIS`, else the pinned install under target/.
fn schemathesis() -> PathBuf {
    if let Ok(path) = std::env::var("SCHEMATHESIS") {
        return PathBuf::from(path);
    }
    let output = std::process::Command::new(repo_path("scripts/schemathesis.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/schemathesis.sh");
    assert!(output.status.success(), "scripts/schemathesis.sh could not install Schemathesis");
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_undocumented_response() {
    let st = schemathesis();
    let app = spawn_app().await;
    let examples = std::env::var("SCHEMATHESIS_MAX_EXAMPLES").unwrap_or_else(|_| "100".into());
    let seed = std::env::var("SCHEMATHESIS_SEED").unwrap_or_else(|_| "1".into());
    let mut st = tokio::process::Command::new(st);
    st.arg("--no-color")
        .arg("--config-file")
        .arg(repo_path("schemathesis.toml"))
        .arg("run")
        .arg(format!("{}/openapi.json", app.http))
        .args(["--max-examples", &examples, "--seed", &seed])
        // Each of its requests is bounded (seconds), and so is the whole run.
        .args(["--request-timeout", "10"])
        .kill_on_drop(true);
    let output = tokio::time::timeout(std::time::Duration::from_secs(480), st.output())
        .await
        .expect("Schemathesis finished within 8 minutes")
        .expect("run Schemathesis");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "Schemathesis found problems:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(report.contains("passed"), "Schemathesis ran no test case:\n{report}");
}
