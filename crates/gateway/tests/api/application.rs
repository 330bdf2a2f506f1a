//! What applications ask of the feed (SPEC section 10), end to end: events
//! published from SQL and over HTTP, column projection and TRUNCATE, each
//! stream compared with the outbox.

use serde_json::{Value, json};
use sqlx::PgPool;

use crate::for_each_source;
use crate::helpers::{Client, barrier, fresh_database_for, gateway_binary, positions, spawn_app_for, spawn_app_with};

/// Every message up to the marker change `marker` (batches unpacked): the
/// changes, events and resets of the client's rooms, in order. Other
/// markers are left out: a client that subscribes to `markers` on an
/// instance whose feed is a moment behind may still see an earlier one.
pub async fn messages_until_marker(client: &mut Client, marker: &str) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let message = client.next_json().await;
        let messages = match message["type"].as_str() {
            Some("batch") => message["changes"].as_array().unwrap().clone(),
            Some("change" | "event" | "reset") => vec![message],
            _ => panic!("unexpected message {message}"),
        };
        for m in messages {
            if m["table"] == "markers" {
                if m["row"]["note"] == marker {
                    return out;
                }
                continue;
            }
            out.push(m);
        }
    }
}

/// The outbox entries reaching `room` after `after`, as (position, op).
pub async fn outbox_of(pool: &PgPool, room: &str, after: i64) -> Vec<(i64, String)> {
    sqlx::query_as(
        "select position, op from realtime.changes
          where position > $2 and ($1 = any (rooms)
                or (op = 'TRUNCATE' and exists (select 1 from unnest(rooms) p where realtime.room_matches(p, $1))))
          order by position",
    )
    .bind(room)
    .bind(after)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// What a client saw, as the outbox's (position, op).
pub fn as_outbox(messages: &[Value]) -> Vec<(i64, String)> {
    messages
        .iter()
        .map(|m| {
            let op = match m["type"].as_str().unwrap() {
                "event" => "EVENT".to_owned(),
                "reset" => "TRUNCATE".to_owned(),
                _ => m["op"].as_str().unwrap().to_owned(),
            };
            (m["position"].as_str().unwrap().parse().unwrap(), op)
        })
        .collect()
}

async fn exec(pool: &PgPool, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

for_each_source! {
async fn published_events_keep_their_place_in_the_transaction_and_a_rollback_publishes_nothing(source) {
    let app = spawn_app_for(source).await;
    let mut client = app.connect().await;
    let start: i64 = client.subscribe("project:1").await.parse().unwrap();
    client.subscribe("markers").await;
    let pool = &app.db.pool;
    exec(
        pool,
        "begin;
         insert into items (id, project_id, body) values (1, 1, 'before');
         select realtime.publish('project:1', 'inspection_passed', '{\"inspection_id\": 7, \"by\": \"Ana\"}');
         insert into items (id, project_id, body) values (2, 1, 'after');
         commit;",
    )
    .await;
    exec(
        pool,
        "begin;
         select realtime.publish('project:1', 'never_happened', '{}');
         insert into items (id, project_id) values (3, 1);
         rollback;",
    )
    .await;
    // From SQL, any size: this one travels as a reference to the outbox.
    exec(
        pool,
        "select realtime.publish('project:1', 'report_generated', jsonb_build_object('pdf', repeat('x', 20000)))",
    )
    .await;
    barrier(pool, "end").await;
    let seen = messages_until_marker(&mut client, "end").await;
    assert_eq!(as_outbox(&seen), outbox_of(pool, "project:1", start).await);
    let kinds: Vec<String> = seen
        .iter()
        .map(|m| match m["type"].as_str().unwrap() {
            "event" => m["event"].as_str().unwrap().to_owned(),
            _ => format!("{} {}", m["op"].as_str().unwrap(), m["key"]["id"]),
        })
        .collect();
    assert_eq!(kinds, ["INSERT 1", "inspection_passed", "INSERT 2", "report_generated"]);
    let event = &seen[1];
    assert_eq!(event["room"], "project:1");
    assert_eq!(event["payload"], json!({"inspection_id": 7, "by": "Ana"}));
    assert!(event["committed_at"].as_str().unwrap().ends_with('Z'), "{event}");
    assert_eq!(seen[3]["payload"]["pdf"].as_str().unwrap().len(), 20000);
    let rolled_back: i64 =
        sqlx::query_scalar("select count(*) from realtime.changes where event = 'never_happened' or key->>'id' = '3'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(rolled_back, 0, "a rolled-back transaction publishes nothing");
    let pending: i64 = sqlx::query_scalar("select count(*) from realtime.pending")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(pending, 0, "nothing is left waiting");
    // What SQL refuses, it says why.
    let refused = sqlx::query("select realtime.publish('__probe:x', 'spoof', '{}')")
        .execute(pool)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("gateway's own"), "{refused}");
    app.stop().await.unwrap();
}
}

for_each_source! {
async fn events_are_retained_and_resumed_like_changes_from_memory_and_from_the_outbox(source) {
    let db = fresh_database_for(source).await;
    let shared = db.shared();
    let first = spawn_app_with(db, |_| {}).await;
    let pool = shared.pool.clone();
    let mut client = first.connect().await;
    let start: i64 = client.subscribe("project:4").await.parse().unwrap();
    exec(
        &pool,
        "select realtime.publish('project:4', 'crew_checked_in', '{\"crew\": 1}')",
    )
    .await;
    let got = client.next_json().await;
    assert_eq!(got["type"], "event", "{got}");
    let seen_at = got["position"].as_str().unwrap().to_owned();
    drop(client);
    for n in 2..=5 {
        exec(
            &pool,
            &format!(
                "begin;
                 select realtime.publish('project:4', 'crew_checked_in', '{{\"crew\": {n}}}');
                 insert into items (id, project_id) values ({n}, 4);
                 commit;"
            ),
        )
        .await;
    }
    // A second instance starts after all of it: its memory has none of it,
    // so resuming there reads the outbox; the first still has it in memory.
    let second = spawn_app_with(shared, |_| {}).await;
    for app in [&first, &second] {
        let mut client = app.connect().await;
        client.subscribe_since("markers", None).await;
        client.subscribe_since("project:4", Some(&seen_at)).await;
        let marker = format!("m{}", app.address.port());
        barrier(&pool, &marker).await;
        let replayed = messages_until_marker(&mut client, &marker).await;
        let after: i64 = seen_at.parse().unwrap();
        assert_eq!(as_outbox(&replayed), outbox_of(&pool, "project:4", after).await);
        let crews: Vec<i64> = replayed
            .iter()
            .filter(|m| m["type"] == "event")
            .map(|m| m["payload"]["crew"].as_i64().unwrap())
            .collect();
        assert_eq!(crews, [2, 3, 4, 5]);
        assert!(positions(&replayed).windows(2).all(|w| w[0] < w[1]));
    }
    assert!(start < seen_at.parse().unwrap());
    second.stop().await.unwrap();
    first.stop().await.unwrap();
}
}

for_each_source! {
async fn projection_hides_excluded_columns_live_replayed_and_in_the_outbox(source) {
    let db = fresh_database_for(source).await;
    let shared = db.shared();
    let pool = db.pool.clone();
    exec(
        &pool,
        "create table drawings (id bigint primary key, project_id int not null, title text, revision int, blob text);
         select realtime.track('public.drawings', array['project:{project_id}'], columns => array['title', 'revision']);",
    )
    .await;
    let app = spawn_app_with(db, |_| {}).await;
    let mut client = app.connect().await;
    let start: i64 = client.subscribe("project:5").await.parse().unwrap();
    client.subscribe("markers").await;
    exec(
        &pool,
        "insert into drawings values (1, 5, 'Level 3 slab', 1, repeat('z', 100000));
         update drawings set revision = 2 where id = 1;",
    )
    .await;
    // Delivered before the projection changes: in wal mode the leader
    // renders a change with the projection of when it writes it.
    let mut live = client.changes(2).await;
    // The operator's command: from now on every column but the blob.
    let tracked = tokio::process::Command::new(gateway_binary())
        .args([
            "track",
            "public.drawings",
            "--room",
            "project:{project_id}",
            "--exclude",
            "blob",
        ])
        .env("DATABASE_URL", &shared.url)
        .env("GATEWAY_AUTH", "none")
        .env_remove("GATEWAY_CONFIG_FILE")
        .output()
        .await
        .unwrap();
    assert!(tracked.status.success(), "{}", String::from_utf8_lossy(&tracked.stderr));
    assert!(String::from_utf8_lossy(&tracked.stdout).contains("every column but blob"));
    exec(
        &pool,
        "update drawings set revision = 3 where id = 1;
         delete from drawings where id = 1;",
    )
    .await;
    barrier(&pool, "end").await;
    live.extend(messages_until_marker(&mut client, "end").await);
    assert_eq!(as_outbox(&live), outbox_of(&pool, "project:5", start).await);
    let rows: Vec<Value> = live.iter().map(|m| m["row"].clone()).collect();
    assert_eq!(rows[0], json!({"id": 1, "title": "Level 3 slab", "revision": 1}));
    assert_eq!(rows[1], json!({"id": 1, "title": "Level 3 slab", "revision": 2}));
    // The template column was left out of the row and still named the room.
    assert_eq!(
        rows[2],
        json!({"id": 1, "project_id": 5, "title": "Level 3 slab", "revision": 3})
    );
    assert_eq!(live[3]["op"], "DELETE");
    assert_eq!(rows[3], rows[2]);
    assert_eq!(live[0]["key"], json!({"id": 1}));
    // The outbox never held the blob.
    let stored: Vec<Value> = sqlx::query_scalar("select row from realtime.changes where table_name = 'drawings'")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(stored.len(), 4);
    assert!(stored.iter().all(|r| r.get("blob").is_none()), "{stored:?}");
    // Replayed from the outbox by an instance that never saw them live.
    let second = spawn_app_with(shared, |_| {}).await;
    let mut resumed = second.connect().await;
    resumed.subscribe("markers").await;
    resumed.subscribe_since("project:5", Some(&start.to_string())).await;
    barrier(&pool, "again").await;
    let replayed = messages_until_marker(&mut resumed, "again").await;
    assert_eq!(replayed, live);
    // Refusals name what was wrong.
    for (sql, says) in [
        (
            "select realtime.track('public.drawings', array['project:{project_id}'], exclude => array['id'])",
            "cannot exclude key column \"id\"",
        ),
        (
            "select realtime.track('public.drawings', array['project:{project_id}'], columns => array['nope'])",
            "column \"nope\"",
        ),
        (
            "select realtime.track('public.drawings', array['p'], columns => array['title'], exclude => array['blob'])",
            "not both",
        ),
    ] {
        let error = sqlx::query(sql).execute(&pool).await.unwrap_err().to_string();
        assert!(error.contains(says), "{sql}: {error}");
    }
    let both = tokio::process::Command::new(gateway_binary())
        .args([
            "track",
            "public.drawings",
            "--room",
            "p",
            "--columns",
            "a",
            "--exclude",
            "b",
        ])
        .env("DATABASE_URL", &app.db.url)
        .output()
        .await
        .unwrap();
    assert!(!both.status.success());
    assert!(String::from_utf8_lossy(&both.stderr).contains("cannot be used with"));
    second.stop().await.unwrap();
    app.stop().await.unwrap();
}
}

for_each_source! {
async fn truncate_resets_every_room_the_templates_can_produce_live_and_on_resume(source) {
    let db = fresh_database_for(source).await;
    let shared = db.shared();
    let app = spawn_app_with(db, |_| {}).await;
    let pool = shared.pool.clone();
    exec(
        &pool,
        "insert into items (id, project_id, body) select g, g % 2 + 1, 'same' from generate_series(1, 6) g",
    )
    .await;
    let mut a = app.connect().await;
    // The seed rows have reached the gateway before the rooms are joined.
    a.subscribe("markers").await;
    barrier(&pool, "seeded").await;
    a.changes_until_marker("seeded").await;
    let start: i64 = a.subscribe("project:1").await.parse().unwrap();
    a.subscribe("item:4").await;
    let mut bystander = app.connect().await;
    bystander.subscribe("markers").await;
    exec(
        &pool,
        "begin;
         truncate items;
         insert into items (id, project_id, body) values (2, 1, 'same');
         commit;",
    )
    .await;
    barrier(&pool, "end").await;
    let seen = messages_until_marker(&mut a, "end").await;
    assert_eq!(seen.len(), 3, "{seen:?}");
    let mut resets: Vec<&str> = seen[..2].iter().map(|m| m["room"].as_str().unwrap()).collect();
    resets.sort();
    assert_eq!(resets, ["item:4", "project:1"]);
    for reset in &seen[..2] {
        assert_eq!(reset["type"], "reset");
        assert_eq!(reset["reason"], "truncated");
        assert_eq!(reset["table"], "items");
        assert_eq!(reset["position"], seen[0]["position"]);
    }
    // The same row again, after the reset: not dropped as a repeat.
    assert_eq!(seen[2]["row"], json!({"id": 2, "project_id": 1, "body": "same"}));
    assert_eq!(as_outbox(&seen[1..]), outbox_of(&pool, "project:1", start).await);
    assert!(
        bystander.changes_until_marker("end").await.is_empty(),
        "other rooms: nothing"
    );
    let patterns: Vec<String> = sqlx::query_scalar("select rooms from realtime.changes where op = 'TRUNCATE'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(patterns, ["item:*", "project:*"]);

    // Resuming across it, from memory and from the outbox: the reset in its place.
    let second = spawn_app_with(shared, |_| {}).await;
    second.wait_for_feed("live").await;
    for (instance, gateway) in [&app, &second].into_iter().enumerate() {
        let mut client = gateway.connect().await;
        client.subscribe("markers").await;
        // The second instance's feed may still be catching up on earlier
        // markers: take them before the subscribe, whose reply comes next.
        let ready = format!("ready{instance}");
        barrier(&pool, &ready).await;
        messages_until_marker(&mut client, &ready).await;
        client.subscribe_since("project:2", Some(&start.to_string())).await;
        let marker = format!("resume{instance}");
        barrier(&pool, &marker).await;
        let replayed = messages_until_marker(&mut client, &marker).await;
        assert_eq!(replayed.len(), 1, "instance {instance}: {replayed:?}");
        assert_eq!(replayed[0]["type"], "reset");
        assert_eq!(replayed[0]["reason"], "truncated");
        assert_eq!(replayed[0]["room"], "project:2");
        assert_eq!(replayed[0]["position"], seen[0]["position"]);
    }
    second.stop().await.unwrap();
    app.stop().await.unwrap();
}
}

for_each_source! {
async fn the_rust_client_delivers_events_and_truncations_once_across_a_reconnect(source) {
    use futures_util::StreamExt;
    use ws_gateway_client::{Client, Update};
    let app = spawn_app_for(source).await;
    let client = Client::builder(app.ws_url()).start();
    let mut sub = client.subscribe("project:6", None).unwrap();
    async fn next(sub: &mut ws_gateway_client::Subscription) -> Option<Update> {
        tokio::time::timeout(crate::helpers::DEADLINE, sub.next())
            .await
            .expect("an update in time")
    }
    let Some(Update::Subscribed { .. }) = next(&mut sub).await else {
        panic!("subscribed first")
    };
    for sql in [
        "select realtime.publish('project:6', 'one', '{}')",
        "insert into items (id, project_id) values (1, 6)",
        "truncate items",
    ] {
        exec(&app.db.pool, sql).await;
    }
    let mut got = Vec::new();
    let mut reconnected = false;
    while got.len() < 3 {
        match next(&mut sub).await {
            Some(Update::Event(e)) => got.push(format!("event {}", e.message["event"].as_str().unwrap())),
            Some(Update::Change(c)) => got.push(format!("change {}", c.message["op"].as_str().unwrap())),
            Some(Update::Reset { reason, .. }) => got.push(reason),
            Some(_) => {}
            None => panic!("the subscription ended"),
        }
        if got.len() == 2 && !reconnected {
            // Reconnect in the middle: the resume must not repeat what came.
            client.reconnect();
            reconnected = true;
        }
    }
    assert_eq!(got, ["event one", "change INSERT", "truncated"]);
    assert_eq!(client.stats().duplicates, 0);
    client.close();
    app.stop().await.unwrap();
}
}

for_each_source! {
async fn post_publish_needs_a_publish_claim_for_the_room_and_says_what_was_wrong(source) {
    use crate::security::{SECRET, jwt, now_s};
    use jsonwebtoken::{EncodingKey, Header, encode};
    let app = spawn_app_with(fresh_database_for(source).await, |s| {
        jwt(s);
        s.limits.max_message_bytes = 4096;
        s.limits.rate_limit = 5;
    })
    .await;
    let sign = |claims: Value| {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let exp = now_s() + 3600;
    let reader = sign(json!({"sub": "web", "exp": exp, "rooms": ["project:*"]}));
    let backend = sign(json!({"sub": "reports", "exp": exp, "publish": ["project:9", "crew:*"]}));
    let mut client = crate::helpers::Client::connect(&format!("{}?token={reader}", app.ws_url())).await;
    client.subscribe("project:9").await;

    let http = reqwest::Client::new();
    let url = format!("http://{}/publish", app.address);
    let post = |token: Option<&str>, body: String| {
        let mut request = http.post(&url).header("content-type", "application/json").body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let text = response.text().await.unwrap();
            (status, text)
        }
    };
    let event =
        |room: &str| json!({"room": room, "event": "report_generated", "payload": {"pdf": "r.pdf"}}).to_string();

    let (status, text) = post(None, event("project:9")).await;
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("missing token"), "{text}");
    let (status, text) = post(Some(&reader), event("project:9")).await;
    assert_eq!(status, 403, "a token without the claim: {text}");
    assert!(text.contains("publish"), "{text}");
    let (status, text) = post(Some(&backend), event("project:1")).await;
    assert_eq!(status, 403, "a room the claim does not grant: {text}");
    for (body, code, says) in [
        ("{not json".to_owned(), "invalid_json", "must be JSON"),
        (
            json!({"event": "x"}).to_string(),
            "invalid_message",
            "\"room\" is missing",
        ),
        (json!({"room": "project:9"}).to_string(), "invalid_message", "\"event\""),
        (
            json!({"room": "project:*", "event": "x"}).to_string(),
            "invalid_room",
            "*",
        ),
        (
            json!({"room": "__probe:1", "event": "x"}).to_string(),
            "invalid_room",
            "gateway's own",
        ),
        (
            json!({"room": "project:9", "event": "x", "extra": 1}).to_string(),
            "invalid_json",
            "unknown field",
        ),
    ] {
        let (status, text) = post(Some(&backend), body.clone()).await;
        assert_eq!(status, 400, "{body}: {text}");
        let reply: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(reply["error"], code, "{body}: {text}");
        assert!(reply["message"].as_str().unwrap().contains(says), "{body}: {text}");
    }
    let big = json!({"room": "project:9", "event": "x", "payload": {"blob": "y".repeat(5000)}}).to_string();
    let (status, text) = post(Some(&backend), big).await;
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("GATEWAY_MAX_MESSAGE_BYTES"), "{text}");

    // Granted: delivered to the room's subscribers, in order, like one from SQL.
    let mut accepted = 0;
    let mut limited = 0;
    for n in 0..12 {
        let body = json!({"room": "project:9", "event": "crew_checked_in", "payload": {"n": n}}).to_string();
        match post(Some(&backend), body).await {
            (200, text) => {
                assert!(text.contains("\"published\":true"), "{text}");
                accepted += 1;
            }
            (429, text) => {
                assert!(text.contains("5 publishes per second"), "{text}");
                limited += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(accepted >= 5 && limited >= 1, "accepted {accepted}, limited {limited}");
    let mut got = Vec::new();
    while got.len() < accepted {
        let message = client.next_json().await;
        let messages = match message["type"].as_str() {
            Some("batch") => message["changes"].as_array().unwrap().clone(),
            _ => vec![message],
        };
        for m in messages {
            assert_eq!(m["type"], "event", "{m}");
            assert_eq!(m["event"], "crew_checked_in");
            got.push(m["payload"]["n"].as_i64().unwrap());
        }
    }
    assert!(got.windows(2).all(|w| w[0] < w[1]), "{got:?}");
    let stored: i64 = sqlx::query_scalar("select count(*) from realtime.changes where event = 'crew_checked_in'")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(stored as usize, accepted, "the outbox holds each accepted one");
    app.stop().await.unwrap();
}
}
