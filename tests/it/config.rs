//! Configuration loading: the shipped file, several files, environment overrides, and
//! one clear line (exit 64) for every kind of mistake.

use std::{collections::HashMap, path::Path, time::Duration};

use resource::conf::{self, AuthMode, NodeId};
use secrecy::ExposeSecret;

use crate::helpers::{BIN, repo_path, run_to_end};

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, body) in files {
        std::fs::write(dir.path().join(name), body).unwrap();
    }
    dir
}

fn shipped() -> String {
    std::fs::read_to_string(repo_path("configs/config.yaml")).unwrap()
}

#[test]
fn the_shipped_config_loads_with_the_documented_values() {
    let conf = conf::load_with_env(&repo_path("configs"), HashMap::new()).unwrap();

    assert_eq!(conf.server.http.addr.to_string(), "0.0.0.0:8000");
    assert_eq!(conf.server.grpc.addr.to_string(), "0.0.0.0:9000");
    assert_eq!(conf.server.http.timeout, Duration::from_secs(1));
    assert_eq!(conf.data.database.driver, "postgres");
    assert_eq!(conf.data.database.max_connections, 16);
    assert!(conf.data.database.migrate);
    assert_eq!(conf.data.rabbitmq.exchange, "resource.events");
    assert_eq!(conf.data.rabbitmq.prefetch, 1000);
    assert!(!conf.data.kubernetes.enabled);
    assert_eq!(conf.auth.mode, AuthMode::None);
    assert_eq!(conf.snowflake.node_id, NodeId::Auto);
    assert!(
        conf.unknown_keys.is_empty(),
        "the shipped file names only real keys: {:?}",
        conf.unknown_keys
    );
}

#[test]
fn environment_overrides_win_over_files() {
    let vars = env(&[
        ("RESOURCE_SERVER__HTTP__ADDR", ":18000"),
        ("RESOURCE_SERVER__GRPC__TIMEOUT", "250ms"),
        ("RESOURCE_DATA__DATABASE__SOURCE", "postgres://app:s3cret@db:5432/resource"),
        ("RESOURCE_DATA__DATABASE__MAX_CONNECTIONS", "7"),
        ("RESOURCE_DATA__DATABASE__MIGRATE", "false"),
        ("RESOURCE_DATA__RABBITMQ__PREFETCH", "64"),
        ("RESOURCE_SNOWFLAKE__NODE_ID", "12"),
        ("UNRELATED_VARIABLE", "ignored"),
    ]);

    let conf = conf::load_with_env(&repo_path("configs"), vars).unwrap();

    assert_eq!(conf.server.http.addr.to_string(), "0.0.0.0:18000");
    assert_eq!(conf.server.grpc.timeout, Duration::from_millis(250));
    assert_eq!(conf.data.database.source.expose_secret(), "postgres://app:s3cret@db:5432/resource");
    assert_eq!(conf.data.database.max_connections, 7);
    assert!(!conf.data.database.migrate);
    assert_eq!(conf.data.rabbitmq.prefetch, 64);
    assert_eq!(conf.snowflake.node_id, NodeId::Fixed(12));
}

#[test]
fn later_files_override_earlier_ones_and_keys_beyond_the_schema_are_fine() {
    let dir = dir_with(&[
        ("00-base.yaml", &shipped()),
        ("10-local.yaml", "server:\n  http:\n    addr: 127.0.0.1:8080\nextra:\n  anything: 1\n"),
        ("README.txt", "not yaml: ["),
    ]);

    let conf = conf::load_with_env(dir.path(), HashMap::new()).unwrap();

    assert_eq!(conf.server.http.addr.to_string(), "127.0.0.1:8080");
    assert_eq!(conf.server.grpc.addr.to_string(), "0.0.0.0:9000");
}

#[test]
fn the_database_password_never_shows_in_debug_output() {
    let vars = env(&[("RESOURCE_DATA__DATABASE__SOURCE", "postgres://app:hunter2@db/resource")]);

    let conf = conf::load_with_env(&repo_path("configs"), vars).unwrap();

    assert!(!format!("{conf:?}").contains("hunter2"));
}

fn load_error(dir: &Path, vars: &[(&str, &str)]) -> String {
    conf::load_with_env(dir, env(vars)).unwrap_err().to_string()
}

#[test]
fn every_mistake_is_one_line_naming_the_file_or_key() {
    let missing = tempfile::tempdir().unwrap().path().join("nope");
    assert!(load_error(&missing, &[]).contains("nope"));

    let empty = dir_with(&[]);
    assert!(load_error(empty.path(), &[]).contains("no *.yaml file"));

    let broken = dir_with(&[("config.yaml", "server: [unclosed\n")]);
    assert!(load_error(broken.path(), &[]).contains("config.yaml"));

    type Case<'a> = (String, &'a [(&'a str, &'a str)], &'a str);
    let cases: Vec<Case> = vec![
        (shipped(), &[("RESOURCE_SERVER__HTTP__TIMEOUT", "soon")], "server.http.timeout"),
        (shipped(), &[("RESOURCE_SERVER__GRPC__ADDR", "nowhere")], "server.grpc.addr"),
        (shipped(), &[("RESOURCE_DATA__DATABASE__DRIVER", "mysql")], "data.database.driver"),
        (shipped(), &[("RESOURCE_DATA__DATABASE__MAX_CONNECTIONS", "many")], "max_connections"),
        (shipped(), &[("RESOURCE_AUTH__MODE", "maybe")], "auth.mode"),
        (
            shipped(),
            &[
                ("RESOURCE_DATA__KUBERNETES__ENABLED", "true"),
                ("RESOURCE_DATA__KUBERNETES__API_QPS", "0"),
            ],
            "api_qps",
        ),
        (
            shipped(),
            &[("RESOURCE_DATA__RABBITMQ__STATUS_ROUTING_KEY", "instance.changed")],
            "data.rabbitmq.status_routing_key",
        ),
        (shipped().replace("  mode: none", "  other: 1"), &[], "mode"),
    ];
    for (body, vars, key) in cases {
        let dir = dir_with(&[("config.yaml", &body)]);

        let message = load_error(dir.path(), vars);

        assert!(message.contains(key), "{key:?} not named in: {message}");
        assert!(!message.contains('\n'), "not one line: {message}");
    }
}

#[tokio::test]
async fn the_binary_accepts_go_style_flags_and_exits_64_on_bad_config() {
    let bad = dir_with(&[("config.yaml", "server: {}\n")]);

    for flag in ["-conf", "--conf", "-c"] {
        let out =
            run_to_end(tokio::process::Command::new(BIN).arg(flag).arg(bad.path()).arg("migrate"))
                .await;

        assert_eq!(out.status.code(), Some(64), "{flag}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{flag}: {stderr}");
        assert!(stderr.contains("invalid configuration"), "{stderr}");
    }

    let out = run_to_end(tokio::process::Command::new(BIN).arg("-conf=/definitely/missing")).await;
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/definitely/missing"));
}

#[tokio::test]
async fn version_prints_without_a_config() {
    let out = run_to_end(tokio::process::Command::new(BIN).arg("version")).await;

    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("resource "));
}

#[tokio::test]
async fn publish_names_itself_in_its_errors_and_exits_64_on_bad_arguments() {
    let out = run_to_end(
        tokio::process::Command::new(BIN).arg("-conf").arg(repo_path("configs")).args([
            "publish",
            "--encoding",
            "xml",
        ]),
    )
    .await;

    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("resource publish: --encoding"), "{stderr}");
}
