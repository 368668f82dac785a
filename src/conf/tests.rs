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

#[test]
fn quotas_come_from_the_files_and_the_environment_and_bad_ones_are_refused() {
    use crate::biz::{GpuType, QuotaConf, quota::QuotaLimits};
    let dir = tempfile::tempdir().unwrap();
    let yaml = std::fs::read_to_string("configs/config.yaml").unwrap();
    std::fs::write(dir.path().join("config.yaml"), yaml).unwrap();
    let defaults = load_with_env(dir.path(), HashMap::new()).unwrap();
    assert_eq!(QuotaConf::from(&defaults.quota), QuotaConf::default(), "unlimited by default");

    std::fs::write(
        dir.path().join("zz-quota.yaml"),
        "quota:\n  per_user: { instances: 10, gpus: 0 }\n  gpu_capacity: { \"2\": 100, \"4\": 0 }\n",
    )
    .unwrap();
    let env = HashMap::from([
        ("RESOURCE_QUOTA__PER_USER__CPU".to_owned(), "64".to_owned()),
        ("RESOURCE_QUOTA__GPU_CAPACITY__3".to_owned(), "8".to_owned()),
    ]);
    let quota = QuotaConf::from(&load_with_env(dir.path(), env).unwrap().quota);
    assert_eq!(
        quota.per_user,
        QuotaLimits { instances: Some(10), cpu: Some(64), memory_mb: None, gpus: None }
    );
    assert_eq!(quota.capacity(GpuType::TeslaA100), Some(100));
    assert_eq!(quota.capacity(GpuType::TeslaH100), Some(8));
    assert_eq!(quota.capacity(GpuType::TeslaT4), Some(0), "0 is no capacity, not unlimited");
    assert_eq!(quota.capacity(GpuType::TeslaV100), None, "an absent type is unlimited");

    for (key, value, says) in [
        ("RESOURCE_QUOTA__GPU_CAPACITY__7", "1", "quota.gpu_capacity: \"7\""),
        ("RESOURCE_QUOTA__GPU_CAPACITY__0", "1", "quota.gpu_capacity: \"0\""),
        ("RESOURCE_QUOTA__GPU_CAPACITY__02", "1", "quota.gpu_capacity: \"02\""),
        ("RESOURCE_QUOTA__GPU_CAPACITY__2", "-1", "quota.gpu_capacity.2"),
        ("RESOURCE_QUOTA__PER_USER__MEMORY_MB", "-5", "quota.per_user"),
    ] {
        let env = HashMap::from([(key.to_owned(), value.to_owned())]);
        let err = load_with_env(dir.path(), env).unwrap_err().to_string();
        assert!(err.contains(says), "{key}={value}: {err}");
    }
}

#[test]
fn watch_settings_default_load_and_are_bounded() {
    use crate::biz::WatchConf;
    let dir = tempfile::tempdir().unwrap();
    let yaml = std::fs::read_to_string("configs/config.yaml").unwrap();
    std::fs::write(dir.path().join("config.yaml"), yaml).unwrap();
    let shipped = load_with_env(dir.path(), HashMap::new()).unwrap();
    assert_eq!(WatchConf::from(&shipped.watch), WatchConf::default(), "the file says the defaults");
    let env = HashMap::from([("RESOURCE_WATCH__HEARTBEAT".to_owned(), "2s".to_owned())]);
    let watch = WatchConf::from(&load_with_env(dir.path(), env).unwrap().watch);
    assert_eq!(watch.heartbeat, Duration::from_secs(2));
    for (key, value, says) in [
        ("RESOURCE_WATCH__RETENTION", "30s", "watch.retention"),
        ("RESOURCE_WATCH__HEARTBEAT", "0s", "watch.heartbeat"),
        ("RESOURCE_WATCH__HEARTBEAT", "1h", "watch.heartbeat"),
        ("RESOURCE_WATCH__MAX_WATCHERS", "0", "watch.max_watchers"),
    ] {
        let env = HashMap::from([(key.to_owned(), value.to_owned())]);
        let err = load_with_env(dir.path(), env).unwrap_err().to_string();
        assert!(err.contains(says), "{key}={value}: {err}");
    }
}
