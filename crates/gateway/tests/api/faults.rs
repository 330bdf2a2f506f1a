//! Nothing lost, nothing duplicated, in commit order, across every fault we
//! can inject. Each test commits N >= 1,000 changes across several rooms from
//! concurrent writers while the fault happens, and checks every subscriber's
//! stream per room against the outbox: equal, in order, once.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::fault_kit::{GatewayProcess, Proxy, Subscriber, Workload, assert_received_everything, free_port, room_of};
use crate::for_each_source;
use crate::helpers::{eventually, fresh_database, fresh_database_for, fresh_database_on, scratch_dir, spawn_app_with};
use pg_private::{ClusterOptions, PrivateCluster, StopMode};
use ws_gateway::config::CaptureSource;

const ROOMS: i64 = 4;
const WRITERS: i64 = 4;

fn all_rooms() -> Vec<String> {
    (0..ROOMS).map(|r| room_of(r, ROOMS)).collect()
}

/// Three subscribers: two to every room, one to a single room.
fn subscribers(urls: &[String], hop_every: usize) -> Vec<(Subscriber, Vec<String>)> {
    let mut out = Vec::new();
    for rooms in [all_rooms(), all_rooms(), vec![room_of(1, ROOMS)]] {
        out.push((Subscriber::start(urls.to_vec(), rooms.clone(), hop_every), rooms));
    }
    out
}

async fn wait_started(subs: &[(Subscriber, Vec<String>)]) {
    for (s, rooms) in subs {
        s.wait_started(rooms.len()).await;
    }
}

async fn check_all(pool: &sqlx::PgPool, subs: &[(Subscriber, Vec<String>)]) {
    for (s, rooms) in subs {
        assert_received_everything(pool, s, rooms).await;
    }
}

fn connections(subs: &[(Subscriber, Vec<String>)]) -> Vec<usize> {
    subs.iter()
        .map(|(s, _)| s.received.lock().unwrap().connections)
        .collect()
}

for_each_source! {
/// The feed's LISTEN connection is killed, again and again, while writers
/// commit; in wal mode the leader's replication connection and its outbox
/// connection (which holds the leader lock) are killed in turn as well.
async fn killing_the_listen_and_replication_connections_loses_and_duplicates_nothing(source) {
    const N: i64 = 2000;
    let app = spawn_app_with(fresh_database_for(source).await, |_| {}).await;
    let subs = subscribers(&[app.ws_url()], 0);
    wait_started(&subs).await;
    let work = Workload::start(&app.db.url, N, ROOMS, WRITERS);

    let victims: &[&str] = match source {
        CaptureSource::Notify => &["ws-gateway feed"],
        CaptureSource::Wal => &["ws-gateway feed", "ws-gateway wal", "ws-gateway wal leader"],
    };
    let mut kills = 0;
    let mut feed_kills = 0;
    // A terminated backend can linger in pg_stat_activity for a moment:
    // never "kill" one twice.
    let mut killed_pids: Vec<i32> = Vec::new();
    while kills < 5 {
        let victim = victims[kills % victims.len()];
        let killed: Option<(i32, bool)> = sqlx::query_as(
            "select pid, pg_terminate_backend(pid) from pg_stat_activity \
             where application_name = $1 and datname = current_database() and not (pid = any($2)) limit 1",
        )
        .bind(victim)
        .bind(&killed_pids)
        .fetch_optional(&app.db.pool)
        .await
        .unwrap();
        if let Some((pid, true)) = killed {
            killed_pids.push(pid);
            kills += 1;
            // Kill the next session only once it is back, mid-stream. The
            // feed's state alone is not enough: it still reads "live" until
            // the gateway notices the kill.
            if victim == "ws-gateway feed" {
                feed_kills += 1;
                eventually("the feed to notice the kill and be live again", || async {
                    let (_, health) = app.health().await;
                    let back = health["feed"]["reconnects"].as_u64()? >= feed_kills && health["feed"]["state"] == "live";
                    back.then_some(())
                })
                .await;
            } else {
                wait_for_leader_streaming(&app.db.pool).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    work.finish().await;
    check_all(&app.db.pool, &subs).await;
    assert_eq!(
        connections(&subs),
        [1, 1, 1],
        "clients stay connected through feed faults"
    );
    let (_, health) = app.health().await;
    assert!(health["feed"]["reconnects"].as_u64().unwrap() >= feed_kills, "{health}");
}
}

/// Waits until a wal leader streams the database's slot again.
async fn wait_for_leader_streaming(pool: &sqlx::PgPool) {
    eventually("a wal leader to stream the slot", || async {
        let streaming: bool = sqlx::query_scalar(
            "select exists (select 1 from pg_replication_slots s join realtime.settings r on r.wal_slot = s.slot_name \
                             where s.active_pid is not null)",
        )
        .fetch_one(pool)
        .await
        .ok()?;
        streaming.then_some(())
    })
    .await
}

async fn postgres_restart(source: CaptureSource, mode: StopMode) {
    const N: i64 = 1500;
    let dir = scratch_dir(&format!("restart-{mode:?}"));
    let cluster = PrivateCluster::start(
        &dir,
        ClusterOptions {
            fast_unsafe: true,
            ..ClusterOptions::default()
        },
    )
    .await
    .unwrap();
    let mut db = fresh_database_on(&cluster.url("postgres")).await;
    db.switch_to(source).await;
    let app = spawn_app_with(db, |_| {}).await;
    let subs = subscribers(&[app.ws_url()], 0);
    wait_started(&subs).await;
    let work = Workload::start(&app.db.url, N, ROOMS, WRITERS);
    work.wait_committed(400).await;
    cluster.restart(mode).await.unwrap();
    work.finish().await;
    // The test's own pool reconnects on use.
    check_all(&app.db.pool, &subs).await;
    assert_eq!(
        connections(&subs),
        [1, 1, 1],
        "clients stay connected through a database restart"
    );
    let (_, health) = app.health().await;
    assert!(health["feed"]["reconnects"].as_u64().unwrap() >= 1, "{health}");
    // Each test process has a cluster of its own: leave no data directory
    // behind (they filled the shared disk).
    drop(app);
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}

for_each_source! {
async fn postgres_restart_fast_loses_and_duplicates_nothing(source) {
    postgres_restart(source, StopMode::Fast).await;
}
}

for_each_source! {
async fn postgres_restart_immediate_loses_and_duplicates_nothing(source) {
    postgres_restart(source, StopMode::Immediate).await;
}
}

/// The gateway's network to the database is cut for 30 s (packets held, no
/// reset, as in a partition) while writers keep committing directly.
#[tokio::test]
async fn database_unreachable_for_30_s_loses_and_duplicates_nothing() {
    const N: i64 = 1200;
    let db = fresh_database().await;
    let server: SocketAddr = {
        let options: sqlx::postgres::PgConnectOptions = db.url.parse().unwrap();
        format!("127.0.0.1:{}", options.get_port()).parse().unwrap()
    };
    let proxy = Proxy::start(server).await;
    let via_proxy = db
        .url
        .replace(&format!(":{}/", server.port()), &format!(":{}/", proxy.port));
    let writer_url = db.url.clone();
    let mut proxied = db;
    proxied.url = via_proxy;
    let app = spawn_app_with(proxied, |_| {}).await;
    let subs = subscribers(&[app.ws_url()], 0);
    wait_started(&subs).await;
    let work = Workload::start(&writer_url, N, ROOMS, WRITERS);
    work.wait_committed(300).await;

    proxy.set_cut(true);
    let cut_at = Instant::now();
    eventually("/healthz to say 503", || async {
        let (status, health) = app.health().await;
        (status == 503 && health["feed"]["state"] == "down").then_some(())
    })
    .await;
    let noticed = cut_at.elapsed();
    assert!(noticed < Duration::from_secs(6), "feed down noticed after {noticed:?}");
    let (_, metrics) = crate::helpers::http_get(app.address, "/metrics").await;
    assert!(metrics.contains("ws_gateway_feed_up 0"), "{metrics}");
    while cut_at.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    proxy.set_cut(false);
    work.finish().await;
    app.wait_for_feed("live").await;
    check_all(&app.db.pool, &subs).await;
    assert_eq!(
        connections(&subs),
        [1, 1, 1],
        "clients stay connected through the outage"
    );
}

/// SIGKILL the gateway process while writers commit; a new one starts on the
/// same address; clients reconnect and resume.
#[tokio::test]
async fn a_killed_gateway_replaced_by_a_new_one_loses_nothing() {
    const N: i64 = 1500;
    let db = fresh_database().await;
    let port = free_port().await;
    let mut gateway = GatewayProcess::start(&db.url, port, &[]).await;
    let subs = subscribers(&[gateway.ws_url()], 0);
    wait_started(&subs).await;
    let work = Workload::start(&db.url, N, ROOMS, WRITERS);
    work.wait_committed(400).await;
    gateway.signal(libc::SIGKILL);
    gateway.wait_exit().await;
    work.wait_committed(800).await;
    let _replacement = GatewayProcess::start(&db.url, port, &[]).await;
    work.finish().await;
    check_all(&db.pool, &subs).await;
    assert!(
        connections(&subs).iter().all(|c| *c >= 2),
        "every client reconnected: {:?}",
        connections(&subs)
    );
}

/// Two instances against one database. Clients hop between them every 150
/// changes; then one instance is stopped with SIGTERM, its clients are told
/// to go (1001) and resume on the other.
#[tokio::test]
async fn clients_move_between_instances_and_survive_a_graceful_stop() {
    const N: i64 = 2000;
    let db = fresh_database().await;
    let mut a = GatewayProcess::start(&db.url, free_port().await, &[]).await;
    let b = GatewayProcess::start(&db.url, free_port().await, &[]).await;
    let urls = vec![a.ws_url(), b.ws_url()];
    let subs = subscribers(&urls, 150);
    wait_started(&subs).await;
    let work = Workload::start(&db.url, N, ROOMS, WRITERS);
    work.wait_committed(1000).await;
    // The hops stop, with one subscriber at least on `a` (the first two hop
    // in step: all three may well be on `b`), so someone is told to go.
    for (s, _) in &subs {
        s.hop_every.store(0, std::sync::atomic::Ordering::Relaxed);
    }
    let url_of = |s: &Subscriber| s.received.lock().unwrap().url.clone();
    eventually("every subscriber connected, hops stopped", || async {
        subs.iter().all(|(s, _)| url_of(s).is_some()).then_some(())
    })
    .await;
    if !subs.iter().any(|(s, _)| url_of(s) == Some(urls[0].clone())) {
        subs[2].0.client.reconnect(); // to the next URL: `a`
        eventually("the third subscriber on a", || async {
            (url_of(&subs[2].0) == Some(urls[0].clone())).then_some(())
        })
        .await;
    }
    a.signal(libc::SIGTERM);
    let status = a.wait_exit().await;
    assert!(status.success(), "graceful stop exits 0: {status:?}\n{}", a.log_text());
    work.finish().await;
    check_all(&db.pool, &subs).await;
    let hops: usize = subs
        .iter()
        .map(|(s, _)| s.hops.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    assert!(hops >= 3, "clients moved between instances: {hops}");
    let told_to_go = subs.iter().any(|(s, _)| {
        s.received
            .lock()
            .unwrap()
            .closes
            .iter()
            .any(|(code, reason)| *code == Some(1001) && reason.contains("resume"))
    });
    assert!(
        told_to_go,
        "clients of the stopped instance were told to reconnect and resume: {:?}",
        subs.iter()
            .map(|(s, _)| s.received.lock().unwrap().closes.clone())
            .collect::<Vec<_>>()
    );
    let log = a.log_text();
    assert!(log.contains("SIGTERM"), "{log}");
}

for_each_source! {
/// An application session that wrote to a tracked table and sits idle in its
/// transaction holds nothing the capture needs: everyone else's changes flow
/// (in wal mode too: a transaction is decoded at its commit).
async fn an_idle_transaction_does_not_stall_other_changes(source) {
    const N: i64 = 1000;
    let app = spawn_app_with(fresh_database_for(source).await, |_| {}).await;
    let pool = app.db.pool.clone();
    let subs = subscribers(&[app.ws_url()], 0);
    wait_started(&subs).await;

    let mut idle = pool.begin().await.unwrap();
    sqlx::query("insert into items (id, project_id, body) values (1000001, 1, 'long transaction')")
        .execute(&mut *idle)
        .await
        .unwrap();
    let work = Workload::start(&app.db.url, N, ROOMS, WRITERS);
    work.finish().await;
    // Everything the writers committed arrives while the idle transaction is
    // still open.
    check_all(&pool, &subs).await;
    idle.commit().await.unwrap();
    check_all(&pool, &subs).await;
    let got_it = subs[0].0.received.lock().unwrap().positions[&room_of(1, ROOMS)].len();
    assert_eq!(got_it as i64, N / ROOMS + 1);
}
}

for_each_source! {
/// Two instances, writers committing, and one instance SIGKILLed mid-stream:
/// in wal mode the leader (the other instance takes the slot over from where
/// the outbox ends), in notify mode the first. Its clients move to the
/// survivor; every subscriber gets everything once, in commit order.
async fn an_instance_killed_under_load_is_taken_over_and_loses_nothing(source) {
    const N: i64 = 2000;
    let db = fresh_database_for(source).await;
    let env = [("GATEWAY_SOURCE", source.as_str())];
    let a = GatewayProcess::start(&db.url, free_port().await, &env).await;
    let b = GatewayProcess::start(&db.url, free_port().await, &env).await;
    let mut instances = [a, b];
    // In wal mode, the one that leads.
    let mut victim = 0;
    if source == CaptureSource::Wal {
        victim = eventually("one instance to lead", || async {
            for (i, g) in instances.iter().enumerate() {
                let (_, health) = crate::helpers::http_get_json(g.address, "/healthz").await;
                if health["feed"]["leader"] == true {
                    return Some(i);
                }
            }
            None
        })
        .await;
    }
    let urls: Vec<String> = [victim, 1 - victim].iter().map(|&i| instances[i].ws_url()).collect();
    let subs = subscribers(&urls, 0);
    wait_started(&subs).await;
    let work = Workload::start(&db.url, N, ROOMS, WRITERS);
    work.wait_committed(600).await;
    instances[victim].signal(libc::SIGKILL);
    instances[victim].wait_exit().await;
    work.finish().await;
    check_all(&db.pool, &subs).await;
    assert!(
        connections(&subs).iter().all(|c| *c >= 2),
        "every client moved to the surviving instance: {:?}",
        connections(&subs)
    );
    if source == CaptureSource::Wal {
        let (_, health) = crate::helpers::http_get_json(instances[1 - victim].address, "/healthz").await;
        assert_eq!(health["feed"]["leader"], true, "the survivor took over: {health}");
    }
    // The outbox holds every committed row once, in commit order.
    let (changes, rows, out_of_order): (i64, i64, i64) = sqlx::query_as(
        "select count(*), count(distinct (row->>'id')), \
                count(*) filter (where commit_lsn < previous) \
           from (select row, commit_lsn, lag(commit_lsn) over (order by position) as previous \
                   from realtime.changes where table_name = 'items') c",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((changes, rows, out_of_order), (N, N, 0));
}
}

/// Prunes by age, then: a resume from before the pruned point gets `reset`,
/// one after it is replayed from the outbox, and a position the database
/// never handed out is refused.
#[tokio::test]
async fn retention_prunes_and_old_resumes_are_told_to_reset() {
    let db = fresh_database().await;
    let pool = db.pool.clone();
    for id in 1..=10 {
        sqlx::query("insert into items (id, project_id) values ($1, 1)")
            .bind(id)
            .execute(&pool)
            .await
            .unwrap();
    }
    let positions: Vec<i64> =
        sqlx::query_scalar("select position from realtime.changes where 'project:1' = any (rooms) order by position")
            .fetch_all(&pool)
            .await
            .unwrap();
    let before_all = positions[0] - 1;
    // The first five are two days old; retention is a day.
    sqlx::query("update realtime.changes set committed_at = now() - interval '2 days' where position <= $1")
        .bind(positions[4])
        .execute(&pool)
        .await
        .unwrap();
    // Only one instance prunes at a time: while another holds the lock, no-op.
    let mut other = pool.begin().await.unwrap();
    sqlx::query("select pg_advisory_xact_lock($1)")
        .bind(ws_gateway::db::PRUNE_LOCK)
        .execute(&mut *other)
        .await
        .unwrap();
    let skipped = ws_gateway::db::prune(&pool, Duration::from_secs(86_400)).await.unwrap();
    assert_eq!(skipped, None);
    other.rollback().await.unwrap();
    let pruned = ws_gateway::db::prune(&pool, Duration::from_secs(86_400)).await.unwrap();
    assert!(pruned.unwrap() >= 5, "{pruned:?}");
    let pruned_through: i64 = sqlx::query_scalar("select pruned_through from realtime.settings")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(pruned_through, positions[4]);

    let app = spawn_app_with(db, |_| {}).await;
    let mut old = app.connect().await;
    let live = old.subscribe_since("project:1", Some(&before_all.to_string())).await;
    let reset = old.next_json().await;
    assert_eq!(reset["type"], "reset", "{reset}");
    assert_eq!(reset["reason"], "history_expired");
    assert_eq!(reset["room"], "project:1");
    // The stream goes on after the position it went live at.
    assert_eq!(reset["position"], serde_json::json!(live), "{reset}");

    let mut recent = app.connect().await;
    recent
        .subscribe_since("project:1", Some(&positions[4].to_string()))
        .await;
    let replayed = recent.changes(5).await;
    assert_eq!(crate::helpers::positions(&replayed), positions[5..]);

    let mut future = app.connect().await;
    future
        .send_json(serde_json::json!({"type": "subscribe", "room": "project:1", "since": "999999999"}))
        .await;
    let error = future.next_json().await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["code"], "invalid_position", "{error}");
}
