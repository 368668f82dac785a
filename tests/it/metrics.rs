//! `GET /metrics` after known traffic, read with a Prometheus text-format parser.

use std::time::Duration;

use prometheus_parse::{Sample, Scrape, Value};
use resource::pb::resource::v1::{
    ListResourcesRequest, resource_service_client::ResourceServiceClient,
};

use crate::{
    helpers::spawn_app,
    mq::{Broker, created},
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
    assert_eq!(
        value(
            &scrape,
            "resource_events_consumed_total",
            &[("type", "UNDECODABLE"), ("outcome", "dead_lettered")]
        )
        .or_else(|| value(
            &scrape,
            "resource_events_consumed_total",
            &[("outcome", "dead_lettered")]
        )),
        Some(1.0)
    );
    assert_eq!(
        value(&scrape, "resource_events_dead_lettered_total", &[("reason", "INVALID_EVENT")]),
        Some(1.0)
    );
    assert!(value(&scrape, "resource_db_pool_connections", &[("state", "in_use")]).is_some());
    assert!(value(&scrape, "resource_outbox_backlog", &[]).is_some());
}
