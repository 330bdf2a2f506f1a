//! A committed change reaches exactly the rooms its templates name, in commit
//! order, whole.

use serde_json::json;

use crate::for_each_source;
use crate::helpers::{barrier, insert_project, positions, spawn_app_for};

for_each_source! {
async fn insert_update_delete_reach_their_rooms_and_nowhere_else(source) {
    let app = spawn_app_for(source).await;
    let pool = &app.db.pool;
    let project_1 = insert_project(pool, "Test One").await;
    let project_2 = insert_project(pool, "Test Two").await;
    // The projects' own changes are not what this test is about.
    app.settle().await;

    let mut in_1 = app.connect().await;
    let mut in_2 = app.connect().await;
    let mut in_task = app.connect().await;
    let mut elsewhere = app.connect().await;
    in_1.subscribe(&format!("project:{project_1}")).await;
    in_2.subscribe(&format!("project:{project_2}")).await;
    elsewhere.subscribe("project:999999").await;
    for client in [&mut in_1, &mut in_2, &mut in_task, &mut elsewhere] {
        client.subscribe("markers").await;
    }

    let task_id: i64 = sqlx::query_scalar(
        "insert into tasks (project_id, title, status) values ($1, 'Pour level 3 slab', 'todo') returning id",
    )
    .bind(project_1)
    .fetch_one(pool)
    .await
    .unwrap();
    barrier(pool, "inserted").await;
    let got_1 = in_1.changes_until_marker("inserted").await;
    assert_eq!(got_1.len(), 1, "{got_1:?}");
    assert_eq!(got_1[0]["op"], "INSERT");
    assert_eq!(got_1[0]["table"], "tasks");
    assert_eq!(got_1[0]["schema"], "public");
    assert_eq!(got_1[0]["room"], format!("project:{project_1}"));
    assert_eq!(got_1[0]["key"], json!({"id": task_id}));
    assert_eq!(got_1[0]["row"]["title"], "Pour level 3 slab");
    assert!(got_1[0]["committed_at"].as_str().unwrap().ends_with('Z'));
    assert!(in_2.changes_until_marker("inserted").await.is_empty());
    assert!(elsewhere.changes_until_marker("inserted").await.is_empty());
    assert!(in_task.changes_until_marker("inserted").await.is_empty());

    // The task room, then a move between projects: the UPDATE belongs to the
    // rooms of the row before and after it.
    in_task.subscribe(&format!("task:{task_id}")).await;
    sqlx::query("update tasks set project_id = $1, status = 'in_progress' where id = $2")
        .bind(project_2)
        .bind(task_id)
        .execute(pool)
        .await
        .unwrap();
    barrier(pool, "moved").await;
    for (client, room) in [
        (&mut in_1, format!("project:{project_1}")),
        (&mut in_2, format!("project:{project_2}")),
        (&mut in_task, format!("task:{task_id}")),
    ] {
        let got = client.changes_until_marker("moved").await;
        assert_eq!(got.len(), 1, "{room}: {got:?}");
        assert_eq!(got[0]["op"], "UPDATE");
        assert_eq!(got[0]["room"], room);
        assert_eq!(got[0]["row"]["project_id"], json!(project_2));
        assert_eq!(got[0]["row"]["status"], "in_progress");
    }
    assert!(elsewhere.changes_until_marker("moved").await.is_empty());

    sqlx::query("delete from tasks where id = $1")
        .bind(task_id)
        .execute(pool)
        .await
        .unwrap();
    barrier(pool, "deleted").await;
    assert!(in_1.changes_until_marker("deleted").await.is_empty());
    for client in [&mut in_2, &mut in_task] {
        let got = client.changes_until_marker("deleted").await;
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["op"], "DELETE");
        assert_eq!(
            got[0]["row"]["title"], "Pour level 3 slab",
            "DELETE carries the row as it was"
        );
    }
    assert!(elsewhere.changes_until_marker("deleted").await.is_empty());
}}

for_each_source! {
/// Two transactions take their ids (and would take sequence-based positions)
/// in one order and commit in the other. Delivery is commit order, and a
/// client resuming from between them misses neither.
async fn positions_follow_commit_order_not_insert_order(source) {
    let app = spawn_app_for(source).await;
    let pool = &app.db.pool;
    let mut live = app.connect().await;
    let start = live.subscribe("project:77").await;

    let mut first = pool.begin().await.unwrap();
    sqlx::query("insert into items (id, project_id, body) values (1, 77, 'took its id first')")
        .execute(&mut *first)
        .await
        .unwrap();
    let mut second = pool.begin().await.unwrap();
    sqlx::query("insert into items (id, project_id, body) values (2, 77, 'took its id second')")
        .execute(&mut *second)
        .await
        .unwrap();
    second.commit().await.unwrap();
    first.commit().await.unwrap();

    let got = live.changes(2).await;
    let ids: Vec<_> = got.iter().map(|c| c["row"]["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [2, 1], "delivered in commit order");
    let p = positions(&got);
    assert!(p[0] < p[1], "positions grow with commit order: {p:?}");

    // Resume from before both, and from between them.
    let mut from_start = app.connect().await;
    from_start.subscribe_since("project:77", Some(&start)).await;
    let replayed = from_start.changes(2).await;
    assert_eq!(positions(&replayed), p);
    let mut from_between = app.connect().await;
    from_between
        .subscribe_since("project:77", Some(&p[0].to_string()))
        .await;
    let replayed = from_between.changes(1).await;
    assert_eq!(
        replayed[0]["row"]["id"], 1,
        "the change that committed second is not skipped"
    );
    assert_eq!(positions(&replayed), [p[1]]);
}}

for_each_source! {
async fn a_100_kb_row_is_delivered_intact(source) {
    let app = spawn_app_for(source).await;
    let mut client = app.connect().await;
    client.subscribe("item:5").await;
    // Varied text so nothing can be mistaken for a truncated repeat.
    let body: String = (0..100_000u32)
        .map(|i| char::from(b'a' + ((i * 7 + i / 13) % 26) as u8))
        .collect();
    sqlx::query("insert into items (id, project_id, body) values (5, 1, $1)")
        .bind(&body)
        .execute(&app.db.pool)
        .await
        .unwrap();
    let got = client.changes(1).await;
    assert_eq!(got[0]["row"]["body"].as_str().unwrap().len(), body.len());
    assert_eq!(got[0]["row"]["body"], body);
    assert_eq!(got[0]["key"], json!({"id": 5}));
    // Stored compressed with lz4 (migrations/0011): this server has it.
    let (position, compression): (i64, Option<String>) = sqlx::query_as(
        "select position, pg_column_compression(row) from realtime.changes where table_name = 'items'",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(position.to_string(), got[0]["position"].as_str().unwrap());
    assert_eq!(compression.as_deref(), Some("lz4"));
}}

for_each_source! {
/// Many rows too large for a NOTIFY in one transaction: the feed reads them
/// back in a few statements (64 per read), and every one arrives intact
/// and in order.
async fn a_transaction_of_many_large_rows_arrives_whole_and_in_order(source) {
    let app = spawn_app_for(source).await;
    let mut client = app.connect().await;
    client.subscribe("project:8").await;
    let mut tx = app.db.pool.begin().await.unwrap();
    for id in 1..=150 {
        sqlx::query(
            "insert into items (id, project_id, body)
             select $1, 8, string_agg(md5($1::text || ':' || i::text), '') from generate_series(1, 300) i",
        )
        .bind(id)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    let got = client.changes(150).await;
    let ids: Vec<i64> = got.iter().map(|c| c["row"]["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, (1..=150).collect::<Vec<_>>());
    for change in &got {
        assert_eq!(change["row"]["body"].as_str().map(str::len), Some(9600), "{}", change["row"]["id"]);
    }
    let p = positions(&got);
    assert!(p.windows(2).all(|w| w[0] < w[1]), "{p:?}");
}}

for_each_source! {
/// A client that reconnects with `since` gets what it missed while away,
/// then the live stream, with nothing twice.
async fn a_reconnecting_client_resumes_from_its_position(source) {
    let app = spawn_app_for(source).await;
    let pool = &app.db.pool;
    let mut client = app.connect().await;
    client.subscribe("project:5").await;
    for id in 1..=3 {
        sqlx::query("insert into items (id, project_id) values ($1, 5)")
            .bind(id)
            .execute(pool)
            .await
            .unwrap();
    }
    let seen = client.changes(3).await;
    let last = seen[2]["position"].as_str().unwrap().to_owned();
    drop(client);

    for id in 4..=6 {
        sqlx::query("insert into items (id, project_id) values ($1, 5)")
            .bind(id)
            .execute(pool)
            .await
            .unwrap();
    }
    let mut client = app.connect().await;
    client.subscribe_since("project:5", Some(&last)).await;
    sqlx::query("insert into items (id, project_id) values (7, 5)")
        .execute(pool)
        .await
        .unwrap();
    let got = client.changes(4).await;
    let ids: Vec<_> = got.iter().map(|c| c["row"]["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [4, 5, 6, 7]);
    let p = positions(&got);
    assert!(p.windows(2).all(|w| w[0] < w[1]), "{p:?}");
}}

for_each_source! {
/// An UPDATE that leaves a large (TOASTed) column unchanged: the WAL record
/// does not carry it, and the wal source fills it from the old row; the
/// UPDATE reaches the rooms of the old and the new row, and the DELETE
/// carries the row as it was.
async fn an_update_leaving_a_large_column_unchanged_delivers_it_whole(source) {
    let app = spawn_app_for(source).await;
    let pool = &app.db.pool;
    let mut old_room = app.connect().await;
    let mut new_room = app.connect().await;
    old_room.subscribe("project:1").await;
    new_room.subscribe("project:2").await;
    // Incompressible text, so that it is stored out of line.
    let body: String = sqlx::query_scalar("select string_agg(md5(i::text), '') from generate_series(1, 3200) i")
        .fetch_one(pool)
        .await
        .unwrap();
    sqlx::query("insert into items (id, project_id, body) values (9, 1, $1)")
        .bind(&body)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("update items set project_id = 2 where id = 9")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("delete from items where id = 9").execute(pool).await.unwrap();
    let inserted_and_moved = old_room.changes(2).await;
    assert_eq!(inserted_and_moved[0]["op"], "INSERT");
    assert_eq!(inserted_and_moved[1]["op"], "UPDATE");
    let moved_and_deleted = new_room.changes(2).await;
    assert_eq!(moved_and_deleted[0]["op"], "UPDATE");
    assert_eq!(moved_and_deleted[1]["op"], "DELETE");
    for change in [&inserted_and_moved[1], &moved_and_deleted[0], &moved_and_deleted[1]] {
        assert_eq!(change["row"]["body"].as_str().map(str::len), Some(body.len()), "{}", change["op"]);
        assert_eq!(change["row"]["body"], body);
        assert_eq!(change["row"]["project_id"], 2);
    }
    assert_eq!(positions(&inserted_and_moved)[1], positions(&moved_and_deleted)[0]);
}
}

/// In wal mode the writers' transactions carry nothing of the gateway: no
/// trigger of ours on a tracked table, which is in the publication with
/// REPLICA IDENTITY FULL instead; and back in notify mode it is as before.
#[tokio::test]
async fn wal_mode_leaves_no_trigger_on_tracked_tables() {
    use ws_gateway::config::CaptureSource;
    let app = spawn_app_for(CaptureSource::Wal).await;
    let pool = &app.db.pool;
    let triggers: Vec<String> = sqlx::query_scalar(
        "select tgrelid::regclass::text from pg_trigger \
         where tgrelid in (select tbl from realtime.tracked) and not tgisinternal",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(
        triggers.is_empty(),
        "triggers on tracked tables in wal mode: {triggers:?}"
    );
    let (published, full): (i64, i64) = sqlx::query_as(
        "select count(*) filter (where exists (select 1 from pg_publication_tables p \
                 where p.pubname = 'ws_gateway' and format('%I.%I', p.schemaname, p.tablename)::regclass = t.tbl)), \
                count(*) filter (where c.relreplident = 'f') \
           from realtime.tracked t join pg_class c on c.oid = t.tbl",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let tracked: i64 = sqlx::query_scalar("select count(*) from realtime.tracked")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(
        (published, full),
        (tracked, tracked),
        "every tracked table published, with REPLICA IDENTITY FULL"
    );

    // Tracking another table in wal mode says what it did to it.
    sqlx::raw_sql("create table extra (id int primary key, note text)")
        .execute(pool)
        .await
        .unwrap();
    ws_gateway::db::track(pool, "public.extra", &["extra:{id}".to_owned()], &Default::default())
        .await
        .unwrap();
    let mut client = app.connect().await;
    client.subscribe("extra:1").await;
    sqlx::query("insert into extra values (1, 'tracked in wal mode')")
        .execute(pool)
        .await
        .unwrap();
    assert_eq!(client.changes(1).await[0]["row"]["note"], "tracked in wal mode");
    let extra_triggers: i64 = sqlx::query_scalar(
        "select count(*) from pg_trigger where tgrelid = 'public.extra'::regclass and not tgisinternal",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(extra_triggers, 0);
    ws_gateway::db::untrack(pool, "public.extra").await.unwrap();
    let identity: String =
        sqlx::query_scalar("select relreplident::text from pg_class where oid = 'public.extra'::regclass")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(identity, "d", "untrack gives the table its REPLICA IDENTITY back");
}
