//! gRPC: the greeter, ListResources and GetResource, error details, health and reflection.

use resource::pb::{
    helloworld::v1::{HelloRequest, greeter_client::GreeterClient},
    resource::v1::{
        GetResourceRequest, ListResourcesRequest, Status as PbStatus,
        resource_service_client::ResourceServiceClient,
    },
};
use tonic::Code;
use tonic_types::StatusExt;

use crate::{
    helpers::{AppOptions, Seed, seed, spawn_app, spawn_app_with},
    proxy::{Proxy, target_of},
};

#[tokio::test]
async fn the_greeter_answers_over_grpc() {
    let app = spawn_app().await;
    let mut client = GreeterClient::new(app.grpc_channel().await);

    let reply = client.say_hello(HelloRequest { name: "kratos".into() }).await.unwrap();

    assert_eq!(reply.into_inner().message, "Hello kratos");
}

#[tokio::test]
async fn list_pages_through_every_instance_with_filters() {
    let app = spawn_app().await;
    let rows: Vec<Seed> =
        (1..=45).map(|id| Seed::new(id).owner(if id % 2 == 0 { "even" } else { "odd" })).collect();
    seed(&app.pool, &rows).await;
    let mut client = ResourceServiceClient::new(app.grpc_channel().await);

    let mut ids = Vec::new();
    let mut page_token = String::new();
    loop {
        let req = ListResourcesRequest {
            page_size: 4,
            page_token,
            user_id: "odd".into(),
            ..Default::default()
        };
        let page = client.list_resources(req).await.unwrap().into_inner();
        ids.extend(page.resources.iter().map(|r| r.instance_id));
        assert!(
            page.resources
                .iter()
                .all(|r| r.user_id == "odd" && r.status == PbStatus::Running as i32)
        );
        page_token = page.next_page_token;
        if page_token.is_empty() {
            break;
        }
    }

    let want: Vec<i64> = (1..=45).rev().filter(|id| id % 2 == 1).collect();
    assert_eq!(ids, want);
}

#[tokio::test]
async fn get_returns_the_instance_and_not_found_carries_error_info() {
    let app = spawn_app().await;
    seed(&app.pool, &[Seed::new(7).named("seven")]).await;
    let mut client = ResourceServiceClient::new(app.grpc_channel().await);

    let found =
        client.get_resource(GetResourceRequest { instance_id: 7 }).await.unwrap().into_inner();
    let missing = client.get_resource(GetResourceRequest { instance_id: 8 }).await.unwrap_err();

    assert_eq!(found.name, "seven");
    assert_eq!(found.spec.unwrap().image, "ubuntu:22.04");
    assert_eq!(missing.code(), Code::NotFound);
    let info = missing.get_error_details().error_info().cloned().expect("ErrorInfo");
    assert_eq!(info.reason, "INSTANCE_NOT_FOUND");
    assert_eq!(info.domain, "resource.v1");
    assert_eq!(info.metadata["instance_id"], "8");
}

#[tokio::test]
async fn bad_arguments_are_invalid_argument_with_a_reason() {
    let app = spawn_app().await;
    let mut client = ResourceServiceClient::new(app.grpc_channel().await);

    let cases = [
        (ListResourcesRequest { page_size: 1001, ..Default::default() }, "INVALID_PAGE_SIZE"),
        (ListResourcesRequest { page_size: -3, ..Default::default() }, "INVALID_PAGE_SIZE"),
        (
            ListResourcesRequest { page_token: "garbage".into(), ..Default::default() },
            "INVALID_PAGE_TOKEN",
        ),
        (ListResourcesRequest { status: 99, ..Default::default() }, "INVALID_ARGUMENT"),
    ];
    for (req, reason) in cases {
        let err = client.list_resources(req.clone()).await.unwrap_err();

        assert_eq!(err.code(), Code::InvalidArgument, "{req:?}");
        assert_eq!(err.get_error_details().error_info().unwrap().reason, reason, "{req:?}");
    }
    let err = client.get_resource(GetResourceRequest { instance_id: 0 }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn a_database_outage_is_unavailable_without_internal_detail() {
    let proxy = Proxy::start(target_of(&crate::helpers::admin_url(), 5432)).await;
    let app =
        spawn_app_with(AppOptions { database_via: Some(proxy.addr), ..Default::default() }).await;
    let mut client = ResourceServiceClient::new(app.grpc_channel().await);

    proxy.cut();
    let err = client.list_resources(ListResourcesRequest::default()).await.unwrap_err();

    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(err.message(), "service unavailable");
    assert_eq!(err.get_error_details().error_info().unwrap().reason, "SERVICE_UNAVAILABLE");
}

#[tokio::test]
async fn health_reports_serving_and_reflection_lists_the_services() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };

    let app = spawn_app().await;
    let channel = app.grpc_channel().await;

    // gRPC health agrees with /readyz (which answered 200 for spawn_app) from the first
    // moment: no polling interval to wait for.
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let mut health = HealthClient::new(channel.clone());
    let req = HealthCheckRequest { service: "resource.v1.resourceService".into() };
    let status = health.check(req).await.unwrap().into_inner().status;
    let whole = health.check(HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(whole.into_inner().status, serving);
    let unknown = health.check(HealthCheckRequest { service: "nope.v1.Nope".into() }).await;
    assert_eq!(unknown.unwrap_err().code(), tonic::Code::NotFound);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().unwrap();

    assert_eq!(status, serving);
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["resource.v1.resourceService", "helloworld.v1.Greeter", "grpc.health.v1.Health"] {
        assert!(names.contains(&want.to_owned()), "{want} not in {names:?}");
    }
}

#[tokio::test]
async fn grpc_health_and_readyz_say_the_same_through_an_outage() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let proxy =
        crate::proxy::Proxy::start(crate::proxy::target_of(&crate::helpers::admin_url(), 5432))
            .await;
    let app = crate::helpers::spawn_app_with(crate::helpers::AppOptions {
        database_via: Some(proxy.addr),
        ..Default::default()
    })
    .await;
    let mut health = HealthClient::new(app.grpc_channel().await);
    let mut watch =
        health.watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    assert_eq!(next_status(&mut watch).await, ServingStatus::Serving as i32);

    proxy.cut();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while app.get("/readyz").await.status() == 200 {
        assert!(tokio::time::Instant::now() < deadline, "readyz never noticed the outage");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let check = health.check(HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(check.into_inner().status, ServingStatus::NotServing as i32, "agrees with /readyz");
    assert_eq!(next_status(&mut watch).await, ServingStatus::NotServing as i32);

    proxy.restore();
    assert_eq!(next_status(&mut watch).await, ServingStatus::Serving as i32);
    let check = health.check(HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(check.into_inner().status, ServingStatus::Serving as i32);
}

/// The next status a health watch sends, within 15 s.
async fn next_status(watch: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>) -> i32 {
    tokio::time::timeout(std::time::Duration::from_secs(15), watch.message())
        .await
        .expect("a status within 15 s")
        .expect("a status")
        .expect("the watch goes on")
        .status
}
