//! Unit tests of `kube`.

use serde_json::json;

use super::*;

fn pod(status: serde_json::Value) -> Pod {
    serde_json::from_value(json!({"metadata": {"name": "inst-1"}, "status": status})).unwrap()
}

#[tokio::test(start_paused = true)]
async fn writes_never_exceed_the_rate_in_any_window_even_after_a_stall() {
    let limiter = Arc::new(RateLimiter::new(10));
    let started = Instant::now();
    let mut sent = Vec::new();
    for round in 0..5 {
        // Woken late (a busy runtime): 10 writers at once, each taking its turn.
        let writers: Vec<_> = (0..10)
            .map(|_| {
                let limiter = limiter.clone();
                tokio::spawn(async move {
                    limiter.acquire().await;
                    Instant::now()
                })
            })
            .collect();
        for w in writers {
            sent.push(w.await.unwrap());
        }
        if round == 2 {
            tokio::time::advance(Duration::from_millis(1_700)).await;
        }
    }
    sent.sort();
    for (i, at) in sent.iter().enumerate() {
        let within = sent[i..].iter().take_while(|t| **t < *at + Duration::from_secs(1)).count();
        assert!(within <= 10, "{within} writes within one second of {:?}", *at - started);
    }
    assert!(started.elapsed() >= Duration::from_secs(4), "50 writes at 10/s take 4 windows");
}

#[test]
fn quantities_compare_as_amounts() {
    assert_eq!(quantity("1Gi"), quantity("1024Mi"));
    assert_eq!(quantity("2"), quantity("2000m"));
    assert_eq!(quantity("1k"), Some(1000.0));
    assert_ne!(quantity("1G"), quantity("1Gi"));
    assert_eq!(quantity("lots"), None);
}

#[test]
fn every_phase_that_is_not_running_says_why() {
    let failed =
        pod(json!({"phase": "Failed", "containerStatuses": [{"name": "main", "ready": false,
        "restartCount": 0, "image": "x", "imageID": "",
        "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}));
    assert_eq!(
        phase(&failed),
        Phase::Failed("pod failed: container OOMKilled (exit code 137)".into())
    );
    let evicted = pod(json!({"phase": "Failed", "reason": "Evicted", "message": "low on memory"}));
    assert_eq!(phase(&evicted), Phase::Failed("pod failed: Evicted: low on memory".into()));
    let silent = pod(json!({"phase": "Failed"}));
    assert_eq!(phase(&silent), Phase::Failed("pod failed (the cluster gave no reason)".into()));
    let gated =
        pod(json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
        "reason": "SchedulingGated", "message": "waiting for a gate"}]}));
    assert_eq!(
        phase(&gated),
        Phase::Pending(Some("not scheduled: SchedulingGated: waiting for a gate".into()))
    );
    let unschedulable =
        pod(json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
        "reason": "Unschedulable", "message": "0/3 nodes are available"}]}));
    assert_eq!(
        phase(&unschedulable),
        Phase::Failed("Unschedulable: 0/3 nodes are available".into())
    );
    let creating = pod(
        json!({"phase": "Pending", "containerStatuses": [{"name": "main", "ready": false,
        "restartCount": 0, "image": "x", "imageID": "", "state": {"waiting": {"reason": "ContainerCreating"}}}]}),
    );
    assert_eq!(phase(&creating), Phase::Pending(None), "the normal course is not news");
}

#[test]
fn a_missing_or_terminating_namespace_is_named() {
    let status = |code: u16, message: &str, kind: &str| {
        kube::Error::Api(Box::new(
            serde_json::from_value(json!({"status": "Failure", "code": code, "message": message,
                "reason": "x", "details": {"name": "ns", "kind": kind}}))
            .unwrap(),
        ))
    };
    let gone = cluster_error(status(404, "namespaces \"ns\" not found", "namespaces"));
    assert!(matches!(gone, ClusterError::NamespaceMissing(_)), "{gone:?}");
    let going = cluster_error(status(
        403,
        "unable to create new content in namespace ns because it is being terminated",
        "pods",
    ));
    assert!(matches!(going, ClusterError::NamespaceMissing(_)), "{going:?}");
    let forbidden = cluster_error(status(403, "pods is forbidden", "pods"));
    assert!(matches!(forbidden, ClusterError::Refused(_)), "{forbidden:?}");
    let throttled = kube::Error::Api(Box::new(
        serde_json::from_value(json!({"status": "Failure", "code": 429, "message": "slow down",
            "reason": "TooManyRequests", "details": {"retryAfterSeconds": 3}}))
        .unwrap(),
    ));
    assert_eq!(cluster_error(throttled).retry_after(), Some(Duration::from_secs(3)));
}
