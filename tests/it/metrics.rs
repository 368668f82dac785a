//! `GET /metrics` after known traffic, read with a Prometheus text-format parser.

use std::{collections::BTreeMap, time::Duration};

use prometheus_parse::{Sample, Scrape, Value};
use resource::pb::resource::v1::{
    ListResourcesRequest, resource_service_client::ResourceServiceClient,
};

use crate::{
    helpers::spawn_app,
    mq::{Broker, created},
    refusals::{raw_call, raw_client},
};

fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|s: &&Sample| s.metric == name)
        .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            Value::Histogram(ref buckets) => buckets.last().map_or(0.0, |b| b.count),
            Value::Summary(_) => f64::NAN,
        })
}

#[tokio::test]
async fn metrics_count_what_was_sent() {
    let app = spawn_app().await;
    for _ in 0..3 {
        assert_eq!(app.get("/v1/resources").await.status(), 200);
    }
    assert_eq!(app.get("/v1/resources/1").await.status(), 404);
    let mut grpc = ResourceServiceClient::new(app.grpc_channel().await);
    for _ in 0..2 {
        grpc.list_resources(ListResourcesRequest::default()).await.unwrap();
    }
    let broker = Broker::connect().await;
    for id in [9_001, 9_002, 9_003] {
        broker.publish(&app, &created(id)).await;
    }
    let mut bad = created(9_004);
    bad.event_type = 99;
    broker.publish(&app, &bad).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let scrape = loop {
        let text = app.get("/metrics").await.text().await.unwrap();
        // prometheus-parse drops samples whose label values hold braces (valid in the
        // format); the route template's `{instance_id}` is spelled `:instance_id` for it.
        let parsable = text.replace("{instance_id}", ":instance_id");
        let scrape = Scrape::parse(parsable.lines().map(|l| Ok(l.to_owned())))
            .expect("Prometheus text format");
        let consumed = value(
            &scrape,
            "resource_events_consumed_total",
            &[("type", "INSTANCE_CREATED"), ("outcome", "acked")],
        );
        let dead = value(&scrape, "resource_events_dead_lettered_total", &[]);
        let sampled = value(&scrape, "resource_db_pool_max_connections", &[]);
        if consumed == Some(3.0) && dead.is_some() && sampled.is_some() {
            break scrape;
        }
        assert!(tokio::time::Instant::now() < deadline, "metrics never caught up:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let http = |route, status| {
        value(
            &scrape,
            "resource_http_requests_total",
            &[("route", route), ("method", "GET"), ("status", status)],
        )
    };
    assert_eq!(http("/v1/resources", "200"), Some(3.0));
    let seen: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "resource_http_requests_total")
        .map(|s| format!("{:?}", s.labels))
        .collect();
    assert_eq!(http("/v1/resources/:instance_id", "404"), Some(1.0), "{seen:?}");
    assert_eq!(
        value(
            &scrape,
            "resource_http_request_duration_seconds_count",
            &[("route", "/v1/resources")]
        ),
        Some(3.0)
    );
    let list = "/resource.v1.resourceService/ListResources";
    assert_eq!(
        value(&scrape, "resource_grpc_requests_total", &[("method", list), ("code", "0")]),
        Some(2.0)
    );
    // One label shape: the undecodable event is counted under type UNDECODABLE, with
    // exactly the labels type and outcome, and under no other series.
    let dead: Vec<(BTreeMap<String, String>, f64)> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "resource_events_consumed_total")
        .filter(|s| s.labels.get("outcome") == Some("dead_lettered"))
        .map(|s| {
            let labels = s.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            let n = match s.value {
                Value::Counter(v) | Value::Untyped(v) => v,
                _ => f64::NAN,
            };
            (labels, n)
        })
        .collect();
    let undecodable = BTreeMap::from([
        ("outcome".into(), "dead_lettered".into()),
        ("type".into(), "UNDECODABLE".into()),
    ]);
    assert_eq!(dead, vec![(undecodable, 1.0)]);
    assert_eq!(
        value(&scrape, "resource_events_dead_lettered_total", &[("reason", "INVALID_EVENT")]),
        Some(1.0)
    );
    assert!(value(&scrape, "resource_db_pool_connections", &[("state", "in_use")]).is_some());
    assert!(value(&scrape, "resource_outbox_backlog", &[]).is_some());
}

#[tokio::test]
async fn made_up_methods_and_unknown_rpcs_do_not_grow_the_exposition() {
    use futures::StreamExt;
    let app = spawn_app().await;
    // One of each, so every series a stranger could reach exists before measuring.
    app.get("/v1/resources").await;
    let size = |text: &str| text.len();
    let before = app.get("/metrics").await.text().await.unwrap();

    let requests = futures::stream::iter(0..20_000).map(|n| {
        let app = &app;
        async move {
            let method = reqwest::Method::from_bytes(format!("M{n}X").as_bytes()).unwrap();
            let path =
                if n % 2 == 0 { format!("/v1/resources/{n}") } else { format!("/made/up/{n}") };
            let response =
                app.client.request(method, format!("{}{path}", app.http)).send().await.unwrap();
            assert!(response.status().is_client_error(), "{}", response.status());
        }
    });
    requests.buffer_unordered(32).collect::<Vec<()>>().await;
    let mut client = raw_client(&app.grpc).await;
    for n in 0..2_000 {
        let path = if n % 2 == 0 {
            format!("/resource.v1.resourceService/Made{n}")
        } else {
            format!("/made.up.v{n}.Service/Call")
        };
        let status = raw_call(&mut client, &path, Vec::new()).await;
        assert_eq!(status.code(), tonic::Code::Unimplemented, "{n}: {status:?}");
    }

    let after = app.get("/metrics").await.text().await.unwrap();
    let methods: std::collections::BTreeSet<&str> = after
        .lines()
        .filter(|l| {
            l.starts_with("resource_http_requests_total{")
                || l.starts_with("resource_grpc_requests_total{")
        })
        .filter_map(|l| l.split("method=\"").nth(1)?.split('"').next())
        .collect();
    assert!(methods.len() <= 6, "method labels: {methods:?}");
    assert!(methods.contains("other"), "{methods:?}");
    // A handful of new series (method `other`, the routes, 404 and 405, gRPC `other`).
    assert!(
        size(&after) < size(&before) + 16 * 1024,
        "/metrics grew from {} to {} bytes",
        size(&before),
        size(&after)
    );
}
