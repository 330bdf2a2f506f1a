//! Faults between the gateway and the database lose nothing and duplicate
//! nothing.

use std::collections::HashMap;
use std::time::Duration;

use crate::helpers::{Client, positions, spawn_app};

/// Kills the gateway's LISTEN connection again and again while a writer
/// commits 1,000 changes; every subscriber gets all 1,000, in commit order,
/// once.
#[tokio::test]
async fn killing_the_listen_connection_loses_and_duplicates_nothing() {
    const CHANGES: i64 = 1000;
    let app = spawn_app().await;
    let pool = app.db.pool.clone();
    let mut subscribers = Vec::new();
    for _ in 0..3 {
        let mut client = app.connect().await;
        client.subscribe("project:9").await;
        subscribers.push(client);
    }

    let writer = tokio::spawn({
        let pool = pool.clone();
        async move {
            for id in 1..=CHANGES {
                sqlx::query("insert into items (id, project_id, body) values ($1, 9, 'change')")
                    .bind(id)
                    .execute(&pool)
                    .await
                    .expect("writer insert");
            }
        }
    });
    let killer = tokio::spawn({
        let pool = pool.clone();
        async move {
            let mut kills = 0;
            while kills < 5 {
                let killed: Option<bool> = sqlx::query_scalar(
                    "select pg_terminate_backend(pid) from pg_stat_activity \
                     where application_name = 'ws-gateway feed' and datname = current_database() limit 1",
                )
                .fetch_optional(&pool)
                .await
                .expect("terminate");
                if killed == Some(true) {
                    kills += 1;
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            kills
        }
    });

    let mut received: Vec<Vec<i64>> = Vec::new();
    for client in &mut subscribers {
        received.push(ids_of(client, CHANGES as usize).await);
    }
    writer.await.unwrap();
    let kills = killer.await.unwrap();
    assert_eq!(kills, 5);
    let expected: Vec<i64> = (1..=CHANGES).collect();
    for ids in received {
        assert_eq!(ids, expected, "every change, in commit order, once");
    }
    let (_, health) = app.health().await;
    assert!(
        health["feed"]["reconnects"].as_u64().unwrap() >= 5,
        "{health}"
    );
}

async fn ids_of(client: &mut Client, count: usize) -> Vec<i64> {
    let changes = client.changes(count).await;
    let p = positions(&changes);
    assert!(
        p.windows(2).all(|w| w[0] < w[1]),
        "positions strictly increase"
    );
    let mut seen = HashMap::new();
    for c in &changes {
        *seen
            .entry(c["position"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    assert!(seen.values().all(|n| *n == 1), "no duplicates");
    changes
        .iter()
        .map(|c| c["row"]["id"].as_i64().unwrap())
        .collect()
}
