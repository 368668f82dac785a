//! Unit tests of `cluster`.

use std::time::Duration;

use serde_json::json;

use super::*;

#[tokio::test(start_paused = true)]
async fn readiness_follows_the_watches_and_the_calls() {
    let health = ClusterHealth::new(&["pods", "services"], Duration::ZERO);
    assert!(health.problem().unwrap().contains("not established"), "not listed yet");
    health.watch_established("pods");
    assert!(!health.listed() && health.problem().is_some(), "every kind must list");
    health.watch_established("services");
    assert!(health.listed());
    assert_eq!(health.problem(), None);

    // One 410 Gone now and then is the normal course: ready once listed again.
    tokio::time::advance(Duration::from_secs(40)).await;
    health.watch_failed("pods", false, "410 Gone");
    assert!(health.problem().is_some(), "down while it lists again");
    health.watch_established("pods");
    assert_eq!(health.problem(), None);

    // A loop of 410s: every watch fails right after its list.
    for _ in 0..3 {
        tokio::time::advance(Duration::from_secs(1)).await;
        health.watch_failed("pods", false, "410 Gone");
        health.watch_established("pods");
    }
    assert!(health.problem().unwrap().contains("times in 60 s"), "{:?}", health.problem());
    // Once a watch stays up, it is ready again.
    tokio::time::advance(WATCH_STABLE).await;
    assert_eq!(health.problem(), None);

    for _ in 0..CALL_FAILURES {
        health.call_failed(false, "403 Forbidden");
    }
    assert!(health.problem().unwrap().contains("403 Forbidden"));
    health.call_succeeded(false);
    assert_eq!(health.problem(), None);

    // Reads answer, every write is refused: not usable, whatever the reads say.
    for _ in 0..CALL_FAILURES {
        health.call_failed(true, "403 Forbidden");
        health.call_succeeded(false);
    }
    assert!(health.problem().unwrap().contains("writes failed"), "{:?}", health.problem());
    // Nothing wrote for a minute: the streak is forgotten.
    tokio::time::advance(WRITE_FAILURES_KEPT).await;
    assert_eq!(health.problem(), None);

    health.namespace(Some("the namespace is gone".into()));
    assert_eq!(health.problem().as_deref(), Some("the namespace is gone"));
}

#[test]
fn config_json_maps_to_the_container() {
    let config = json!({"env": {"A": "1", "N": 2, "F": 4.0, "B": true}, "command": ["/app"], "args": ["-v"],
                        "ports": [{"name": "http", "port": 8080}, {"port": 53, "protocol": "udp"}],
                        "other": {"kept": "but unused"}});
    let c = ContainerConfig::from_config(&config).unwrap();
    assert_eq!(c.env["N"], "2");
    assert_eq!(c.env["F"], "4");
    assert_eq!(c.env["B"], "true");
    assert_eq!(c.command, ["/app"]);
    assert_eq!(c.args, ["-v"]);
    assert_eq!(c.ports[1], Port { name: "p53".into(), port: 53, protocol: "UDP".into() });
}

#[test]
fn config_json_that_does_not_fit_is_refused() {
    for config in [
        json!({"env": []}),
        json!({"env": {"1A": "x"}}),
        json!({"env": {"A": {"nested": 1}}}),
        json!({"command": "not a list"}),
        json!({"args": [1]}),
        json!({"ports": [{"port": 0}]}),
        json!({"ports": [{"port": 80, "protocol": "SCTP"}]}),
        json!({"ports": [{"port": 80, "name": "Bad_Name"}]}),
        json!({"ports": [{"port": 80, "name": "a"}, {"port": 81, "name": "a"}]}),
    ] {
        assert!(ContainerConfig::from_config(&config).is_err(), "{config}");
    }
}
