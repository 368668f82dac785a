//! Unit tests of `conf`.

use super::*;

#[test]
fn go_durations_parse() {
    let cases = [
        ("1s", Duration::from_secs(1)),
        ("500ms", Duration::from_millis(500)),
        ("0.2s", Duration::from_millis(200)),
        ("1m30s", Duration::from_secs(90)),
        ("2h", Duration::from_secs(7200)),
        ("0", Duration::ZERO),
    ];
    for (raw, want) in cases {
        assert_eq!(parse_duration(raw), Ok(want), "{raw}");
    }
    for raw in ["", "1", "s", "1x", "1.2.3s", "-1s", "9999999999999999h", "1e400s"] {
        assert!(parse_duration(raw).is_err(), "{raw} should be rejected");
    }
}

#[test]
fn go_style_addresses_parse() {
    assert_eq!(parse_addr(":8000").unwrap(), "0.0.0.0:8000".parse().unwrap());
    assert_eq!(parse_addr("127.0.0.1:9").unwrap(), "127.0.0.1:9".parse().unwrap());
    assert!(parse_addr("localhost").is_err());
}

#[test]
fn a_jwt_audience_is_a_string_or_a_list() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = std::fs::read_to_string("configs/config.yaml").unwrap();
    std::fs::write(dir.path().join("config.yaml"), yaml).unwrap();
    std::fs::write(
        dir.path().join("zz-auth.yaml"),
        "auth:\n  mode: jwt\n  jwt:\n    secret: s\n    audience: [api, \"https://api.example.com\"]\n",
    )
    .unwrap();
    let conf = load_with_env(dir.path(), HashMap::new()).unwrap();
    assert_eq!(conf.auth.jwt.audience, ["api", "https://api.example.com"]);
    assert_eq!(
        (conf.auth.jwt.roles_claim.as_str(), conf.auth.jwt.admin_role.as_str()),
        ("role", "admin")
    );

    let env = HashMap::from([("RESOURCE_AUTH__JWT__AUDIENCE".to_owned(), "account".to_owned())]);
    let conf = load_with_env(dir.path(), env).unwrap();
    assert_eq!(conf.auth.jwt.audience, ["account"]);

    let env = HashMap::from([("RESOURCE_AUTH__JWT__ROLES_CLAIM".to_owned(), "a..b".to_owned())]);
    assert!(load_with_env(dir.path(), env).unwrap_err().to_string().contains("roles_claim"));
}

#[test]
fn unknown_keys_are_named_with_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = std::fs::read_to_string("configs/config.yaml").unwrap();
    std::fs::write(dir.path().join("config.yaml"), yaml).unwrap();
    std::fs::write(dir.path().join("zz.yaml"), "data:\n  databse:\n    source: x\ntrace: {}\n")
        .unwrap();
    let env = HashMap::from([("RESOURCE_SERVER__HTTP__TIMEOUTT".to_owned(), "2s".to_owned())]);

    let conf = load_with_env(dir.path(), env).unwrap();

    assert_eq!(conf.unknown_keys, ["data.databse", "server.http.timeoutt", "trace"]);
}

#[test]
fn topic_patterns_match_like_rabbitmq() {
    assert!(topic_matches("instance.*", "instance.created"));
    assert!(!topic_matches("instance.*", "instance.status.changed"));
    assert!(topic_matches("instance.#", "instance.status.changed"));
    assert!(topic_matches("#", "anything.at.all"));
    assert!(!topic_matches("instance.*", "instance"));
}
