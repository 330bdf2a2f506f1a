//! Health, metrics and shutdown.

use crate::helpers::{http_get, spawn_app};

#[tokio::test]
async fn healthz_reports_the_spec_fields() {
    let app = spawn_app().await;
    let mut client = app.connect().await;
    client.subscribe("project:1").await;
    sqlx::query("insert into items (id, project_id) values (1, 1)")
        .execute(&app.db.pool)
        .await
        .unwrap();
    client.changes(1).await;
    // Connections publish their measurements every 100 ms.
    crate::helpers::eventually("the delivery to be measured", || async {
        let (_, health) = app.health().await;
        (health["latency"]["count"].as_u64() >= Some(1)).then_some(())
    })
    .await;
    let (status, health) = app.health().await;
    assert_eq!(status, 200);
    for field in [
        "status",
        "connections",
        "rooms",
        "timestamp",
        "performance",
        "cache",
        "connectionPool",
        "messageOptimization",
        "regressionDetection",
        "latency",
        "feed",
    ] {
        assert!(!health[field].is_null(), "missing {field}: {health}");
    }
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["connections"], 1);
    assert_eq!(health["rooms"], 1);
    assert_eq!(health["feed"]["state"], "live");
    assert!(health["latency"]["count"].as_u64().unwrap() >= 1, "{health}");
    assert!(health["latency"]["p99_ms"].as_f64().unwrap() >= 0.0);
    let (status, metrics) = http_get(app.address, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("ws_gateway_commit_to_send_seconds_bucket{le=\"+Inf\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn shutdown_closes_every_connection_with_1001() {
    let app = spawn_app().await;
    let mut a = app.connect().await;
    let mut b = app.connect().await;
    a.subscribe("project:1").await;
    app.shutdown.cancel();
    for client in [&mut a, &mut b] {
        let closed = client.closed().await;
        assert_eq!(closed.code, Some(1001), "{closed:?}");
        assert!(closed.reason.contains("resume"), "{closed:?}");
    }
    app.stop().await.expect("a clean stop");
}
