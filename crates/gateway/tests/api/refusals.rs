//! Every refusal a client or operator can cause is seen with its error, and
//! harms no one else.

use futures_util::SinkExt;
use serde_json::json;

use crate::helpers::spawn_app;

#[tokio::test]
async fn bad_frames_get_errors_and_everyone_carries_on() {
    let app = spawn_app().await;
    let mut bystander = app.connect().await;
    bystander.subscribe("project:3").await;
    let mut client = app.connect().await;

    let cases: Vec<(String, &str)> = vec![
        ("this is not json".into(), "invalid_json"),
        (json!({"type": "dance"}).to_string(), "unknown_type"),
        (json!({"type": "subscribe"}).to_string(), "invalid_message"),
        (json!({"type": "ping", "id": 7}).to_string(), "invalid_message"),
        (json!({"type": "subscribe", "room": ""}).to_string(), "invalid_room"),
        (
            json!({"type": "subscribe", "room": "project:3", "since": "-1"}).to_string(),
            "invalid_position",
        ),
        (
            json!({"type": "unsubscribe", "room": "project:404"}).to_string(),
            "not_subscribed",
        ),
        (
            format!(r#"{{"type":"subscribe","room":"{}"}}"#, "x".repeat(1_000_000)),
            "message_too_big",
        ),
    ];
    for (frame, code) in cases {
        client.send_text(&frame).await;
        let reply = client.next_json().await;
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["code"], code, "{reply}");
        assert!(!reply["message"].as_str().unwrap().is_empty());
    }
    client
        .ws
        .send(tokio_tungstenite::tungstenite::Message::binary(vec![1, 2, 3]))
        .await
        .unwrap();
    let reply = client.next_json().await;
    assert_eq!(reply["code"], "binary_not_supported", "{reply}");

    // The misbehaving connection still works, and so does everyone else;
    // `ping` is answered at once, with the client's id.
    client.send_json(json!({"type": "ping", "id": "p-1"})).await;
    assert_eq!(client.next_json().await, json!({"type": "pong", "id": "p-1"}));
    client.send_json(json!({"type": "ping"})).await;
    assert_eq!(client.next_json().await, json!({"type": "pong"}));
    client.subscribe("project:3").await;
    client
        .send_json(json!({"type": "subscribe", "room": "project:3", "id": "again"}))
        .await;
    let again = client.next_json().await;
    assert_eq!(again["code"], "already_subscribed");
    // Protocol 2: the refusal names the request (room, id); a request
    // refused for its own content too.
    assert_eq!((&again["room"], &again["id"]), (&json!("project:3"), &json!("again")));
    client
        .send_json(json!({"type": "unsubscribe", "room": "project:404"}))
        .await;
    assert_eq!(client.next_json().await["room"], "project:404");
    client
        .send_json(json!({"type": "subscribe", "room": "a b", "id": "bad"}))
        .await;
    let bad = client.next_json().await;
    assert_eq!(
        (&bad["code"], &bad["room"], &bad["id"]),
        (&json!("invalid_room"), &json!("a b"), &json!("bad"))
    );
    assert_eq!(client.welcome["protocol"], 2, "{}", client.welcome);
    sqlx::query("insert into items (id, project_id) values (1, 3)")
        .execute(&app.db.pool)
        .await
        .unwrap();
    for c in [&mut client, &mut bystander] {
        let got = c.changes(1).await;
        assert_eq!(got[0]["row"]["id"], 1);
    }
}

#[tokio::test]
async fn a_frame_beyond_the_hard_limit_closes_with_1009() {
    let app = spawn_app().await;
    let mut bystander = app.connect().await;
    bystander.subscribe("project:3").await;
    let mut client = app.connect().await;
    // Past 16x GATEWAY_MAX_MESSAGE_BYTES (and 2 MiB) the frame is not read.
    let _ = client
        .ws
        .send(tokio_tungstenite::tungstenite::Message::text("y".repeat(3 << 20)))
        .await;
    let closed = client.closed().await;
    assert_eq!(closed.code, Some(1009), "{closed:?}");
    sqlx::query("insert into items (id, project_id) values (1, 3)")
        .execute(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(bystander.changes(1).await[0]["row"]["id"], 1);
}

#[tokio::test]
async fn an_invalid_setting_is_refused_at_start_naming_it() {
    let cases = [
        ("GATEWAY_BATCH_SIZE", "lots"),
        ("GATEWAY_LISTEN", "not-an-address"),
        ("GATEWAY_HISTORY_RETENTION", "forever"),
        ("GATEWAY_FEATURES", "dedup,teleport"),
        ("GATEWAY_BATCH_SIZ", "10"),
    ];
    for (variable, value) in cases {
        let output = tokio::process::Command::new(crate::helpers::gateway_binary())
            .arg("serve")
            .env_clear()
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
            .env("GATEWAY_AUTH", "none")
            .env(variable, value)
            .output()
            .await
            .unwrap();
        assert!(!output.status.success(), "{variable}={value} accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(variable), "{variable}: {stderr}");
        assert!(stderr.contains(value), "{variable}: {stderr}");
    }
    // JWT auth, the default, needs its secret.
    let output = tokio::process::Command::new(crate::helpers::gateway_binary())
        .arg("serve")
        .env_clear()
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("GATEWAY_JWT_SECRET"));
}

/// The two settings that changed nothing were removed; one left in the
/// environment or the config file stops the gateway with why.
#[tokio::test]
async fn removed_settings_are_refused_at_start_with_why() {
    let serve = |extra: &[(&str, &str)]| {
        let mut command = tokio::process::Command::new(crate::helpers::gateway_binary());
        command
            .arg("serve")
            .env_clear()
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
            .env("GATEWAY_AUTH", "none");
        for (name, value) in extra {
            command.env(name, value);
        }
        command
    };
    let refused = |output: std::process::Output| {
        assert!(!output.status.success(), "started");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };

    let stderr = refused(serve(&[("GATEWAY_BATCH_TIMEOUT_MS", "100")]).output().await.unwrap());
    assert!(
        stderr.contains("GATEWAY_BATCH_TIMEOUT_MS was removed: use GATEWAY_BATCH_LINGER_MS")
            && stderr.contains("remove it"),
        "{stderr}"
    );

    let file = std::env::temp_dir().join(format!("ws-gateway-removed-{}.env", std::process::id()));
    std::fs::write(&file, "GATEWAY_BATCH_SIZE=20\nGATEWAY_BATCH_TIMEOUT_MS=250\n").unwrap();
    let output = serve(&[("GATEWAY_CONFIG_FILE", file.to_str().unwrap())])
        .output()
        .await
        .unwrap();
    let _ = std::fs::remove_file(&file);
    let stderr = refused(output);
    assert!(
        stderr.contains("GATEWAY_BATCH_TIMEOUT_MS=\"250\"") && stderr.contains("was removed"),
        "{stderr}"
    );

    let stderr = refused(
        serve(&[("GATEWAY_PRIORITY_TABLES", "safety_incidents=critical,audit_log=low")])
            .output()
            .await
            .unwrap(),
    );
    assert!(stderr.contains("GATEWAY_PRIORITY_TABLES"), "{stderr}");
    assert!(stderr.contains("`audit_log=low`"), "{stderr}");
    assert!(stderr.contains("`low`, which was removed"), "{stderr}");
    assert!(stderr.contains("critical, high or normal"), "{stderr}");
}

#[tokio::test]
async fn unknown_tables_and_columns_are_refused_by_track() {
    let app = spawn_app().await;
    let pool = &app.db.pool;
    let error = ws_gateway::db::track(pool, "public.nope", &["x:{id}".into()], &Default::default())
        .await
        .unwrap_err();
    assert!(format!("{error:#}").contains("nope"), "{error:#}");
    let error = ws_gateway::db::track(pool, "public.items", &["x:{missing}".into()], &Default::default())
        .await
        .unwrap_err();
    assert!(format!("{error:#}").contains("missing"), "{error:#}");
    // Tracking twice is fine, and so is untracking twice.
    ws_gateway::db::track(pool, "public.items", &["item:{id}".into()], &Default::default())
        .await
        .unwrap();
    ws_gateway::db::untrack(pool, "public.items").await.unwrap();
    ws_gateway::db::untrack(pool, "public.items").await.unwrap();
}
