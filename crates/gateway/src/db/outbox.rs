//! Reading the outbox (`realtime.changes`): what the notify source catches
//! up from after LISTEN, the one change a NOTIFY reference points to, and a
//! room's history for a socket's replay. Documents come back as the capture
//! trigger's JSON (`realtime.payload`), parsed by `crate::change`.

use sqlx::{PgPool, Postgres, Transaction};

use super::POSITION_LOCK;
use crate::change::Position;

/// Takes and releases the position lock: waits out every transaction that
/// is committing changes right now (their positions are allocated under it).
pub async fn wait_out_commits(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("select pg_advisory_xact_lock($1)")
        .bind(POSITION_LOCK)
        .execute(pool)
        .await?;
    Ok(())
}

/// How far the outbox was pruned: changes at or below it are gone.
pub async fn pruned_through(pool: &PgPool) -> Result<Position, sqlx::Error> {
    let pruned: i64 = sqlx::query_scalar("select pruned_through from realtime.settings")
        .fetch_one(pool)
        .await?;
    Ok(Position(pruned))
}

/// The last position in the outbox (0 when it is empty).
pub async fn outbox_end(pool: &PgPool) -> Result<Position, sqlx::Error> {
    let end: i64 = sqlx::query_scalar("select coalesce(max(position), 0) from realtime.changes")
        .fetch_one(pool)
        .await?;
    Ok(Position(end))
}

/// Up to `limit` documents after `from`, in position order.
pub async fn changes_after(pool: &PgPool, from: Position, limit: i64) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "select realtime.payload(c) from realtime.changes c where c.position > $1 order by c.position limit $2",
    )
    .bind(from.0)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// The document at `position` (a change too large for its NOTIFY).
pub async fn change_document(pool: &PgPool, position: Position) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("select realtime.payload(c) from realtime.changes c where c.position = $1")
        .bind(position.0)
        .fetch_one(pool)
        .await
}

/// The last position the database handed out (committed or not).
pub async fn latest_position(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("select last_value from realtime.position_seq")
        .fetch_one(pool)
        .await
}

/// A room's history read in one snapshot (repeatable read, read only), so
/// the pruning horizon and the pages agree.
pub struct HistoryRead {
    tx: Transaction<'static, Postgres>,
}

impl HistoryRead {
    pub async fn begin(pool: &PgPool) -> Result<HistoryRead, sqlx::Error> {
        let mut tx = pool.begin().await?;
        sqlx::query("set transaction isolation level repeatable read, read only")
            .execute(&mut *tx)
            .await?;
        Ok(HistoryRead { tx })
    }

    /// How far the outbox was pruned, in this snapshot.
    pub async fn pruned_through(&mut self) -> Result<Position, sqlx::Error> {
        let pruned: i64 = sqlx::query_scalar("select pruned_through from realtime.settings")
            .fetch_one(&mut *self.tx)
            .await?;
        Ok(Position(pruned))
    }

    /// Up to `limit` documents of `room` in `(after, upto]`, in position order.
    pub async fn room_page(
        &mut self,
        room: &str,
        after: Position,
        upto: Position,
        limit: i64,
    ) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar(
            "select realtime.payload(c) from realtime.changes c \
             where c.position > $1 and c.position <= $2 and $3 = any (c.rooms) \
             order by c.position limit $4",
        )
        .bind(after.0)
        .bind(upto.0)
        .bind(room)
        .bind(limit)
        .fetch_all(&mut *self.tx)
        .await
    }
}
