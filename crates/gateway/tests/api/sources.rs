//! The capture source as a property of the database (SPEC section 8):
//! switching it with `ws-gateway source`, gateways that disagree with it,
//! roles that cannot replicate, and the replication slot's lag.

use crate::fault_kit::{GatewayProcess, Subscriber, Workload, assert_received_everything, free_port, room_of};
use crate::helpers::{
    DEADLINE, eventually, fresh_database, fresh_database_for, gateway_binary, http_get, spawn_app_with,
};
use ws_gateway::config::CaptureSource;

/// `ws-gateway ARGS` against `database_url`: its exit status and output.
async fn ws_gateway(database_url: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut command = tokio::process::Command::new(gateway_binary());
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", database_url)
        .env("GATEWAY_AUTH", "none")
        .env("GATEWAY_LISTEN", "127.0.0.1:0")
        .kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    let output = tokio::time::timeout(DEADLINE * 3, command.output())
        .await
        .expect("the command ends in time")
        .expect("running ws-gateway");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// notify -> wal -> notify with the CLI, gateways restarted with the
/// matching GATEWAY_SOURCE each time, clients connected throughout: every
/// change reaches every subscriber once, in commit order. The first switch
/// is made with the writers paused (the documented procedure); the second
/// while they write, which the switch makes them wait for.
#[tokio::test]
async fn switching_notify_wal_notify_loses_nothing_and_clients_resume_across() {
    const STEP: i64 = 300;
    let db = fresh_database().await;
    let port = free_port().await;
    let rooms: Vec<String> = (0..4).map(|r| room_of(r, 4)).collect();
    let mut gateway = GatewayProcess::start(&db.url, port, &[]).await;
    let subs: Vec<Subscriber> = (0..2)
        .map(|_| Subscriber::start(vec![gateway.ws_url()], rooms.clone(), 0))
        .collect();
    for s in &subs {
        s.wait_started(rooms.len()).await;
    }
    Workload::start(&db.url, STEP, 4, 4).finish().await;

    // Writers paused: to wal.
    let (ok, out) = ws_gateway(&db.url, &["source", "wal"], &[]).await;
    assert!(ok, "{out}");
    assert!(out.contains("from notify to wal"), "{out}");
    let (ok, out) = ws_gateway(&db.url, &["source"], &[]).await;
    assert!(ok && out.contains("wal"), "{out}");
    // The notify gateway still serves what is in the outbox; a wal one
    // takes its place (clients reconnect and resume).
    gateway.signal(libc::SIGTERM);
    assert!(gateway.wait_exit().await.success(), "{}", gateway.log_text());
    let mut gateway = GatewayProcess::start(&db.url, port, &[("GATEWAY_SOURCE", "wal")]).await;
    Workload::start(&db.url, 2 * STEP, 4, 4).finish().await;
    for s in &subs {
        assert_received_everything(&db.pool, s, &rooms).await;
    }
    let triggers: i64 = sqlx::query_scalar(
        "select count(*) from pg_trigger where tgrelid = 'public.items'::regclass and not tgisinternal",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(triggers, 0, "no trigger of ours in wal mode");

    // Writers writing: back to notify, the wal gateway draining the slot.
    let work = Workload::start(&db.url, 4 * STEP, 4, 4);
    work.wait_committed(2 * STEP as u64 + 100).await;
    let (ok, out) = ws_gateway(&db.url, &["source", "notify"], &[]).await;
    assert!(ok, "{out}\n{}", gateway.log_text());
    assert!(out.contains("from wal to notify"), "{out}");
    work.finish().await;
    gateway.signal(libc::SIGTERM);
    assert!(gateway.wait_exit().await.success(), "{}", gateway.log_text());
    let _gateway = GatewayProcess::start(&db.url, port, &[]).await;
    Workload::start(&db.url, 5 * STEP, 4, 4).finish().await;
    for s in &subs {
        assert_received_everything(&db.pool, s, &rooms).await;
        assert!(
            s.received.lock().unwrap().connections >= 3,
            "clients resumed across both restarts"
        );
    }

    // The outbox: every row once, positions in commit order across both
    // switches, and nothing of the slot left behind.
    let (changes, rows): (i64, i64) = sqlx::query_as(
        "select count(*), count(distinct (row->>'id')) from realtime.changes where table_name = 'items'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((changes, rows), (5 * STEP, 5 * STEP));
    let leftovers: i64 = sqlx::query_scalar(
        "select (select count(*) from pg_replication_slots where database = current_database()) \
              + (select count(*) from pg_publication)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(leftovers, 0, "the slot and the publication are dropped");
    let identity: String =
        sqlx::query_scalar("select relreplident::text from pg_class where oid = 'public.items'::regclass")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(identity, "d", "REPLICA IDENTITY is back to what it was");
}

/// A gateway whose GATEWAY_SOURCE is not the database's refuses to start,
/// naming both; so does a wal gateway (and the switch) for a role that may
/// not replicate.
#[tokio::test]
async fn a_gateway_that_disagrees_with_the_database_refuses_to_start_naming_both() {
    let notify_db = fresh_database().await;
    let (ok, out) = ws_gateway(&notify_db.url, &["serve"], &[("GATEWAY_SOURCE", "wal")]).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("GATEWAY_SOURCE=wal") && out.contains("capture source is notify"),
        "{out}"
    );
    let wal_db = fresh_database_for(CaptureSource::Wal).await;
    let (ok, out) = ws_gateway(&wal_db.url, &["serve"], &[("GATEWAY_SOURCE", "notify")]).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("GATEWAY_SOURCE=notify") && out.contains("capture source is wal"),
        "{out}"
    );
    let (ok, out) = ws_gateway(&wal_db.url, &["serve"], &[("GATEWAY_SOURCE", "sideways")]).await;
    assert!(
        !ok && out.contains("GATEWAY_SOURCE") && out.contains("notify") && out.contains("wal"),
        "{out}"
    );

    // A role without REPLICATION.
    sqlx::raw_sql("drop role if exists ws_gateway_no_replication; create role ws_gateway_no_replication login")
        .execute(&notify_db.pool)
        .await
        .unwrap();
    let options: sqlx::postgres::PgConnectOptions = notify_db.url.parse().unwrap();
    let plain_role = options.username("ws_gateway_no_replication");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(plain_role)
        .await
        .unwrap();
    let refused = ws_gateway::switch_to_wal(&pool, None, DEADLINE).await.unwrap_err();
    let message = format!("{refused:#}");
    assert!(
        message.contains("ws_gateway_no_replication") && message.contains("REPLICATION"),
        "{message}"
    );
}

/// WAL retained while no instance leads is reported, by every instance:
/// `/healthz` `feed.slot_lag_bytes`, `ws_gateway_slot_lag_bytes`. Once a
/// leader runs again it captures everything and the lag goes down.
#[tokio::test]
async fn slot_lag_is_reported_while_no_leader_runs() {
    let db = fresh_database_for(CaptureSource::Wal).await;
    // Holding the leader lock keeps the gateway a follower.
    let mut holder = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    sqlx::query("select pg_advisory_lock($1)")
        .bind(ws_gateway::db::LEADER_LOCK)
        .execute(&mut holder)
        .await
        .unwrap();
    let app = spawn_app_with(db, |_| {}).await;
    let mut client = app.connect().await;
    client.subscribe("project:1").await;
    sqlx::query(
        "insert into items (id, project_id, body) select i, 1, repeat('x', 1000) from generate_series(1, 200) i",
    )
    .execute(&app.db.pool)
    .await
    .unwrap();
    let lag = eventually("slot lag to be reported", || async {
        let (_, health) = app.health().await;
        let lag = health["feed"]["slot_lag_bytes"].as_i64()?;
        (lag > 200_000).then_some(lag)
    })
    .await;
    let (_, health) = app.health().await;
    assert_eq!(health["feed"]["source"], "wal");
    assert_eq!(health["feed"]["leader"], false, "{health}");
    let (_, metrics) = http_get(app.address, "/metrics").await;
    let reported: i64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ws_gateway_slot_lag_bytes "))
        .unwrap_or_else(|| panic!("no ws_gateway_slot_lag_bytes in {metrics}"))
        .parse()
        .unwrap();
    assert!(reported > 200_000, "{reported} (healthz said {lag})");
    assert!(metrics.contains("ws_gateway_wal_leader 0"), "{metrics}");

    // A leader again: everything arrives, and the lag is confirmed away.
    sqlx::Connection::close(holder).await.unwrap();
    assert_eq!(client.changes(200).await.len(), 200);
    eventually("the lag to go down", || async {
        let (_, health) = app.health().await;
        let lag = health["feed"]["slot_lag_bytes"].as_i64()?;
        (health["feed"]["leader"] == true && lag < 100_000).then_some(())
    })
    .await;
}

/// A lost slot (dropped by hand, or invalidated past
/// `max_slot_wal_keep_size`) cannot be streamed again: what it held is
/// gone. The leader recreates it and writes a reset of every room
/// (`history_lost`) at a position after the gap, so that live subscribers
/// and resumes across it (from memory and from the outbox) are told, and
/// nothing committed after the new slot is lost.
#[tokio::test]
async fn a_lost_slot_resets_every_room_live_and_on_resume_and_loses_nothing_after() {
    use crate::application::messages_until_marker;
    use crate::helpers::barrier;
    let db = fresh_database_for(CaptureSource::Wal).await;
    let shared = db.shared();
    let pool = shared.pool.clone();
    let slot: String = sqlx::query_scalar("select wal_slot from realtime.settings")
        .fetch_one(&pool)
        .await
        .unwrap();
    let app = spawn_app_with(db, |_| {}).await;
    let mut client = app.connect().await;
    client.subscribe("markers").await;
    let start: i64 = client.subscribe("project:1").await.parse().unwrap();
    let exec = |sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::raw_sql(sql).execute(&pool).await.unwrap() }
    };
    exec("insert into items (id, project_id) values (1, 1)").await;
    barrier(&pool, "before").await;
    let before = messages_until_marker(&mut client, "before").await;
    assert_eq!(before.len(), 1, "{before:?}");

    // Lose the slot: end its walsender, and drop it before the leader is back.
    eventually("the slot to be dropped", || async {
        sqlx::query(
            "select pg_terminate_backend(active_pid) from pg_replication_slots \
             where slot_name = $1 and active_pid is not null",
        )
        .bind(&slot)
        .execute(&pool)
        .await
        .unwrap();
        let dropped = sqlx::query(
            "select pg_drop_replication_slot(slot_name) from pg_replication_slots \
             where slot_name = $1 and active_pid is null",
        )
        .bind(&slot)
        .execute(&pool)
        .await
        .map(|done| done.rows_affected() == 1);
        matches!(dropped, Ok(true)).then_some(())
    })
    .await;

    // Every room the client is in is told, once.
    let mut resets = Vec::new();
    while resets.len() < 2 {
        let message = client.next_json().await;
        assert_eq!(message["type"], "reset", "{message}");
        assert_eq!(message["reason"], "history_lost", "{message}");
        resets.push(message);
    }
    let mut rooms: Vec<&str> = resets.iter().map(|m| m["room"].as_str().unwrap()).collect();
    rooms.sort();
    assert_eq!(rooms, ["markers", "project:1"]);
    assert_eq!(resets[0]["position"], resets[1]["position"]);
    let reset_at: i64 = resets[0]["position"].as_str().unwrap().parse().unwrap();
    let stored: (String, Vec<String>, String) =
        sqlx::query_as("select op, rooms, event from realtime.changes where position = $1")
            .bind(reset_at)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(stored, ("RESET".into(), vec!["*".into()], "history_lost".into()));

    // The new slot captures everything from here.
    exec("insert into items (id, project_id) values (2, 1)").await;
    barrier(&pool, "after").await;
    let after = messages_until_marker(&mut client, "after").await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0]["key"]["id"], 2);
    assert!(after[0]["position"].as_str().unwrap().parse::<i64>().unwrap() > reset_at);
    let (_, metrics) = http_get(app.address, "/metrics").await;
    assert!(metrics.contains("ws_gateway_slot_resets_total 1"), "{metrics}");

    // Resuming across it: from memory here, from the outbox on an instance
    // that started after it.
    let second = spawn_app_with(shared, |_| {}).await;
    for (instance, gateway) in [&app, &second].into_iter().enumerate() {
        let mut resumed = gateway.connect().await;
        resumed.subscribe("markers").await;
        resumed.subscribe_since("project:1", Some(&start.to_string())).await;
        let marker = format!("resume{instance}");
        barrier(&pool, &marker).await;
        let replayed = messages_until_marker(&mut resumed, &marker).await;
        let seen: Vec<String> = replayed
            .iter()
            .map(|m| match m["type"].as_str().unwrap() {
                "reset" => format!("reset {}", m["reason"].as_str().unwrap()),
                _ => format!("{} {}", m["op"].as_str().unwrap(), m["key"]["id"]),
            })
            .collect();
        assert_eq!(
            seen,
            ["INSERT 1", "reset history_lost", "INSERT 2"],
            "instance {instance}"
        );
        assert_eq!(replayed[1]["position"].as_str().unwrap(), reset_at.to_string());
    }
    second.stop().await.unwrap();
    app.stop().await.unwrap();
}

/// 0004 (application capture) and 0005 (the wal source) each replaced
/// `install_trigger` and `untrack`; on a database that applied 0005 before
/// 0004 (the wal branch's databases) the later one overwrote the other's.
/// 0006 defines them once for both sources: whatever the order before it,
/// a tracked table gets its TRUNCATE trigger and projection in notify mode,
/// and no trigger but the publication in wal mode.
#[tokio::test]
async fn migration_0006_repairs_a_database_that_applied_0005_before_0004() {
    let (_url, pool) = crate::helpers::empty_database().await;
    let mut conn = pool.acquire().await.unwrap();
    sqlx::raw_sql("create schema realtime; set search_path to realtime")
        .execute(&mut *conn)
        .await
        .unwrap();
    for sql in [
        include_str!("../../migrations/0001_realtime.sql"),
        include_str!("../../migrations/0002_probe.sql"),
        include_str!("../../migrations/0003_generated_capture.sql"),
        include_str!("../../migrations/0005_wal_source.sql"),
        include_str!("../../migrations/0004_application_capture.sql"),
        include_str!("../../migrations/0006_wal_application.sql"),
    ] {
        sqlx::raw_sql(sql).execute(&mut *conn).await.unwrap();
    }
    sqlx::raw_sql(
        "reset search_path;
         create table docs (id bigint primary key, project_id int, secret text);
         select realtime.track('public.docs', array['project:{project_id}'], exclude => array['secret']);
         insert into docs values (1, 1, 'hidden');",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::raw_sql("truncate docs").execute(&mut *conn).await.unwrap();
    let stored: Vec<(String, Option<serde_json::Value>)> =
        sqlx::query_as("select op, row from realtime.changes where table_name = 'docs' order by position")
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    assert_eq!(
        stored,
        [
            ("INSERT".to_owned(), Some(serde_json::json!({"id": 1, "project_id": 1}))),
            ("TRUNCATE".to_owned(), None)
        ]
    );
    async fn triggers(pool: &sqlx::PgPool) -> Vec<String> {
        sqlx::query_scalar("select tgname::text from pg_trigger where tgrelid = 'public.docs'::regclass order by 1")
            .fetch_all(pool)
            .await
            .unwrap()
    }
    async fn published(pool: &sqlx::PgPool) -> i64 {
        sqlx::query_scalar("select count(*) from pg_publication_rel where prrelid = 'public.docs'::regclass")
            .fetch_one(pool)
            .await
            .unwrap()
    }
    assert_eq!(triggers(&pool).await, ["realtime_capture", "realtime_truncate"]);

    drop(conn);
    ws_gateway::switch_to_wal(
        &pool,
        Some(&format!("ws_gateway_order_{}", std::process::id())),
        DEADLINE,
    )
    .await
    .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    assert!(triggers(&pool).await.is_empty(), "no trigger of ours in wal mode");
    assert_eq!(published(&pool).await, 1);
    sqlx::query("select realtime.untrack('public.docs')")
        .execute(&mut *conn)
        .await
        .unwrap();
    assert_eq!(published(&pool).await, 0, "untrack in wal mode leaves the publication");
    let slot: String = sqlx::query_scalar("select wal_slot from realtime.settings")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    sqlx::query("select pg_drop_replication_slot($1)")
        .bind(&slot)
        .execute(&mut *conn)
        .await
        .unwrap();
}

/// `realtime.publish` reads the source under a lock a switch takes, and a
/// switch locks every tracked table. A transaction that publishes and
/// writes a tracked table holds one of the two while it waits for the
/// other, in its own order; a switch that held one while waiting for the
/// other made a cycle, and PostgreSQL aborted one of them (often the
/// application's transaction: "deadlock detected"). Here publishers of both
/// orders, and publish-only ones, run in tight loops while the database
/// switches notify -> wal -> notify twice: no application transaction
/// fails, and every committed event and row is in the outbox once. Under
/// this load (some transaction always between its two locks) a switch may
/// give way until its wait runs out and refuse: that refusal is the only
/// other outcome allowed.
#[tokio::test]
async fn publishers_of_both_orders_racing_switches_never_fail_and_every_event_lands_once() {
    let refused = race_publishers_and_switches(&[Steps::InsertFirst, Steps::PublishFirst, Steps::PublishOnly]).await;
    for refusal in refused {
        assert!(
            refusal.contains("gives way") && refusal.contains("pause the writers"),
            "{refusal}"
        );
    }
}

/// The same race with the usual order (write the rows, then publish about
/// them) and publish-only transactions (POST /publish): every switch
/// succeeds under the load, because publishers queue behind a waiting
/// switch rather than overtake it.
#[tokio::test]
async fn publishers_writing_then_publishing_never_fail_and_switches_succeed_under_load() {
    let refused = race_publishers_and_switches(&[Steps::InsertFirst, Steps::PublishOnly]).await;
    assert!(refused.is_empty(), "switches refused: {refused:?}");
}

#[derive(Clone, Copy, Debug)]
enum Steps {
    InsertFirst,
    PublishFirst,
    PublishOnly,
}

/// Two publishers of each of `kinds` in tight loops (each statement its
/// own round trip, so that a switch can come between) while the database
/// switches notify -> wal -> notify twice, each switch allowed 5 s. Asserts
/// that no publishing transaction failed and that the outbox has every
/// committed event and row once; returns the switches' refusals.
async fn race_publishers_and_switches(kinds: &[Steps]) -> Vec<String> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    let mut db = fresh_database().await;
    let stop = Arc::new(AtomicBool::new(false));
    let next_id = Arc::new(AtomicI64::new(1_000_000));
    let publishers: Vec<_> = kinds
        .iter()
        .chain(kinds)
        .map(|&kind| {
            let (url, stop, next_id) = (db.url.clone(), Arc::clone(&stop), Arc::clone(&next_id));
            tokio::spawn(async move {
                let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await.unwrap();
                let (mut events, mut rows, mut failures) = (0i64, 0i64, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    let insert = format!("insert into items (id, project_id) values ({id}, 1)");
                    let publish = format!("select realtime.publish('project:1', 'race', '{{\"id\": {id}}}')");
                    let steps = match kind {
                        Steps::InsertFirst => vec![insert, publish],
                        Steps::PublishFirst => vec![publish, insert],
                        Steps::PublishOnly => vec![publish],
                    };
                    let inserts = steps.len() as i64 - 1;
                    match one_transaction(&mut conn, steps).await {
                        Ok(()) => {
                            events += 1;
                            rows += inserts;
                        }
                        Err(error) => {
                            let _ = sqlx::Executor::execute(&mut conn, "rollback").await;
                            failures.push(format!("{kind:?}: {error}"));
                        }
                    }
                }
                (events, rows, failures)
            })
        })
        .collect();

    let mut refusals = Vec::new();
    for _ in 0..2 {
        for source in [CaptureSource::Wal, CaptureSource::Notify] {
            let switched = match source {
                CaptureSource::Wal => {
                    ws_gateway::switch_to_wal(&db.pool, None, std::time::Duration::from_secs(5)).await
                }
                CaptureSource::Notify => {
                    ws_gateway::switch_to_notify(&db.pool, &db.url, std::time::Duration::from_secs(5)).await
                }
            };
            if let Err(error) = switched {
                refusals.push(format!("to {source:?}: {error:#}"));
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (mut events, mut rows, mut failures) = (0, 0, Vec::new());
    for publisher in publishers {
        let (e, r, f) = publisher.await.unwrap();
        events += e;
        rows += r;
        failures.extend(f);
    }
    // Back to notify with the writers stopped (the wal period's changes
    // drained into the outbox), whatever the last switch did.
    db.switch_to(CaptureSource::Wal).await;
    db.switch_to(CaptureSource::Notify).await;
    assert!(
        failures.is_empty(),
        "{} publishing transactions failed: {failures:?}",
        failures.len()
    );
    assert!(events > 50, "the publishers ran ({events} transactions)");

    let (stored_events, distinct_events): (i64, i64) = sqlx::query_as(
        "select count(*), count(distinct row->>'id') from realtime.changes where op = 'EVENT' and event = 'race'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let (stored_rows, distinct_rows): (i64, i64) = sqlx::query_as(
        "select count(*), count(distinct key->>'id') from realtime.changes \
          where table_name = 'items' and op = 'INSERT'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (stored_events, distinct_events),
        (events, events),
        "every committed event once"
    );
    assert_eq!((stored_rows, distinct_rows), (rows, rows), "every committed row once");
    refusals
}

/// `steps` in one transaction, each its own round trip.
async fn one_transaction(conn: &mut sqlx::PgConnection, steps: Vec<String>) -> Result<(), sqlx::Error> {
    use sqlx::Executor;
    conn.execute("begin").await?;
    for step in steps {
        conn.execute(step.as_str()).await?;
    }
    conn.execute("commit").await?;
    Ok(())
}

/// `ws-gateway source notify` when the slot is gone (an operator dropped
/// it, or `max_slot_wal_keep_size` invalidated it): nothing can be drained,
/// so the switch needs no leader (one would try to recreate the slot, and
/// slot creation waits for the switch's own transaction). It says what was
/// lost, resets every room (`history_lost`) at the next position, as a
/// leader does for a lost slot, and capture goes on by trigger after it.
#[tokio::test]
async fn switching_to_notify_with_the_slot_gone_resets_every_room_and_needs_no_leader() {
    let db = fresh_database_for(CaptureSource::Wal).await;
    let slot: String = sqlx::query_scalar("select wal_slot from realtime.settings")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    // No gateway runs: this change is in the slot only, and goes with it.
    sqlx::raw_sql("insert into items (id, project_id) values (1, 1)")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("select pg_drop_replication_slot($1)")
        .bind(&slot)
        .execute(&db.pool)
        .await
        .unwrap();
    let before: i64 = sqlx::query_scalar("select coalesce(max(position), 0) from realtime.changes")
        .fetch_one(&db.pool)
        .await
        .unwrap();

    let (ok, out) = ws_gateway(&db.url, &["source", "notify"], &[]).await;
    assert!(ok, "{out}");
    assert!(out.contains("from wal to notify"), "{out}");
    assert!(
        out.contains(&format!("replication slot {slot} was gone")) && out.contains("history_lost"),
        "{out}"
    );
    let (position, op, rooms, reason): (i64, String, Vec<String>, String) =
        sqlx::query_as("select position, op, rooms, event from realtime.changes order by position desc limit 1")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(position > before, "{position} after {before}");
    assert_eq!(
        (op.as_str(), rooms, reason.as_str()),
        ("RESET", vec!["*".to_owned()], "history_lost")
    );
    assert!(out.contains(&format!("at position {position}")), "{out}");

    let (ok, out) = ws_gateway(&db.url, &["source"], &[]).await;
    assert!(ok && out.contains("notify"), "{out}");
    let (triggers, slots, publications): (i64, i64, i64) = sqlx::query_as(
        "select (select count(*) from pg_trigger where tgrelid = 'public.items'::regclass and tgname = 'realtime_capture'),
                (select count(*) from pg_replication_slots where database = current_database()),
                (select count(*) from pg_publication)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((triggers, slots, publications), (1, 0, 0));
    sqlx::raw_sql("insert into items (id, project_id) values (2, 1)")
        .execute(&db.pool)
        .await
        .unwrap();
    let after: Vec<(i64, serde_json::Value)> =
        sqlx::query_as("select position, key from realtime.changes where position > $1 order by position")
            .bind(position)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0].1, serde_json::json!({"id": 2}));
}

/// A switch that cannot take its locks in time (a transaction holds a
/// tracked table) refuses, naming the table, and changes nothing: the
/// source stays, and the slot it created for the switch is dropped again.
#[tokio::test]
async fn a_switch_that_cannot_lock_a_tracked_table_in_time_refuses_naming_it() {
    use sqlx::{Connection, Executor};
    let db = fresh_database().await;
    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    holder.execute("begin; lock table items in share mode").await.unwrap();
    let refused = ws_gateway::switch_to_wal(&db.pool, None, std::time::Duration::from_secs(2))
        .await
        .unwrap_err();
    let message = format!("{refused:#}");
    assert!(
        message.contains("switching to wal") && message.contains("items") && message.contains("pause the writers"),
        "{message}"
    );
    holder.execute("commit").await.unwrap();
    let (source, slots): (String, i64) = sqlx::query_as(
        "select (select source from realtime.settings),
                (select count(*) from pg_replication_slots where database = current_database())",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((source.as_str(), slots), ("notify", 0));
}

/// A table added to the publication by hand, never tracked, has neither
/// a write function of its own (migrations/0010) nor render functions: the
/// leader, finding the first missing, writes its batch with
/// `realtime.wal_write`, which skips such changes with a warning, and goes
/// on: the next change of a tracked table arrives, and the outbox has none
/// of the untracked table's.
#[tokio::test]
async fn a_table_published_by_hand_is_skipped_and_the_leader_goes_on() {
    let app = crate::helpers::spawn_app_for(CaptureSource::Wal).await;
    let pool = &app.db.pool;
    sqlx::query("create table by_hand (id int primary key, note text)")
        .execute(pool)
        .await
        .unwrap();
    let publication: String = sqlx::query_scalar("select wal_publication from realtime.settings")
        .fetch_one(pool)
        .await
        .unwrap();
    sqlx::query(&format!("alter publication {publication} add table by_hand"))
        .execute(pool)
        .await
        .unwrap();
    let mut client = app.connect().await;
    client.subscribe("markers").await;
    sqlx::query("insert into by_hand values (1, 'published, not tracked')")
        .execute(pool)
        .await
        .unwrap();
    // Taken by the leader alone (the probe's change could share its batch,
    // which then goes to wal_write directly): its progress passes it.
    let committed: String = sqlx::query_scalar("select pg_current_wal_lsn()::text")
        .fetch_one(pool)
        .await
        .unwrap();
    eventually("the leader to pass the untracked table's change", || async {
        let passed: bool = sqlx::query_scalar("select end_lsn >= $1::pg_lsn from realtime.wal_progress")
            .bind(&committed)
            .fetch_one(pool)
            .await
            .unwrap();
        passed.then_some(())
    })
    .await;
    crate::helpers::barrier(pool, "after").await;
    let got = client.changes_until_marker("after").await;
    assert!(got.is_empty(), "nothing of by_hand is delivered: {got:?}");
    let in_outbox: i64 = sqlx::query_scalar("select count(*) from realtime.changes where table_name = 'by_hand'")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(in_outbox, 0, "nothing of by_hand is in the outbox");
}

/// The leader's own feed takes each small batch the leader commits ahead
/// of the batch's NOTIFY (`source/notify.rs` says when, and why that never
/// reorders): the changes arrive once and in commit order, the NOTIFYs that
/// follow are dropped as repeats, and `/metrics` counts what was handed
/// off (the leader's channel nearly always beats the NOTIFY; each hand-off
/// it loses to is dropped and the NOTIFY delivers it).
#[tokio::test]
async fn the_leaders_own_feed_takes_its_batches_at_commit_once_and_in_order() {
    let app = crate::helpers::spawn_app_for(CaptureSource::Wal).await;
    let pool = &app.db.pool;
    let project = crate::helpers::insert_project(pool, "Handed off").await;
    app.settle().await;
    let mut client = app.connect().await;
    client.subscribe(&format!("project:{project}")).await;
    client.subscribe("markers").await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let id: i64 =
            sqlx::query_scalar("insert into tasks (project_id, title, status) values ($1, $2, 'todo') returning id")
                .bind(project)
                .bind(format!("task {i}"))
                .fetch_one(pool)
                .await
                .unwrap();
        ids.push(id);
    }
    crate::helpers::barrier(pool, "inserted").await;
    let got: Vec<i64> = client
        .changes_until_marker("inserted")
        .await
        .iter()
        .map(|c| c["key"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(got, ids, "every change once, in commit order");
    // On a quiet machine the hand-off takes nearly every batch; on a busy
    // one the NOTIFY can win the race for a whole run of them (then the
    // hand-offs are dropped, as they must be). Changes one at a time, each
    // delivered before the next, until one went by hand-off.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut more = 0;
    while crate::helpers::metric(app.address, "ws_gateway_wal_changes_handed_off_total").await < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no batch reached the feed by hand-off, in 20 changes and {more} more"
        );
        more += 1;
        sqlx::query("insert into tasks (project_id, title, status) values ($1, $2, 'todo')")
            .bind(project)
            .bind(format!("one more {more}"))
            .execute(pool)
            .await
            .unwrap();
        let marker = format!("more-{more}");
        crate::helpers::barrier(pool, &marker).await;
        let got = client.changes_until_marker(&marker).await;
        assert_eq!(got.len(), 1, "once: {got:?}");
    }
}
