//! Reading the outbox (`realtime.changes`): what the notify source catches
//! up from after LISTEN, the one change a NOTIFY reference points to, and a
//! room's history for a socket's replay. Documents come back as the capture
//! trigger's JSON (`realtime.payload`), parsed by `crate::change`.

use sqlx::PgPool;

use super::POSITION_LOCK;
use crate::change::Position;
use crate::hub::Room;

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

/// The documents at `positions` (changes too large for their NOTIFY), in
/// the order asked, in one statement; a position not in the outbox is left
/// out.
pub async fn change_documents(pool: &PgPool, positions: &[Position]) -> Result<Vec<(i64, String)>, sqlx::Error> {
    let positions: Vec<i64> = positions.iter().map(|p| p.0).collect();
    sqlx::query_as(
        "select c.position, realtime.payload(c)
           from unnest($1::bigint[]) with ordinality w(position, i)
           join realtime.changes c on c.position = w.position
          order by w.i",
    )
    .bind(positions)
    .fetch_all(pool)
    .await
}

/// The last position the database handed out (committed or not).
pub async fn latest_position(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("select last_value from realtime.position_seq")
        .fetch_one(pool)
        .await
}

/// One page of the history of `rooms` in `(after, upto]` (one room for a
/// `/ws` subscription, every room of an `/sse` stream; a truncation reaches
/// a room by its patterns, as a reset does), read in one statement
/// (one snapshot) that holds no connection once it returns: the pruning
/// horizon in that snapshot, and up to `max_rows` documents in position
/// order whose stored sizes add up to at most `max_bytes` (always at least
/// one, so a row larger than the budget is a page of its own).
///
/// The budget counts `pg_column_size` (the stored, possibly compressed,
/// size), which needs no detoasting: only the rows of the page are read in
/// full.
pub async fn room_page(
    pool: &PgPool,
    rooms: &[Room],
    after: Position,
    upto: Position,
    max_rows: i64,
    max_bytes: i64,
) -> Result<RoomPage, sqlx::Error> {
    let (pruned, positions, documents): (i64, Vec<i64>, Vec<String>) = sqlx::query_as(
        "with page as (
             select c.position,
                    sum(coalesce(pg_column_size(c.row), 0)) over (order by c.position)
                        - coalesce(pg_column_size(c.row), 0) as before
               from realtime.changes c
              where c.position > $1 and c.position <= $2
                and (c.rooms && $3::text[]
                     or (c.op in ('TRUNCATE', 'RESET') and exists (
                         select 1 from unnest(c.rooms) p, unnest($3::text[]) r
                          where realtime.room_matches(p, r))))
              order by c.position
              limit $4
         ),
         chosen as (select position from page where before < $5)
         select (select pruned_through from realtime.settings),
                array(select position from chosen order by position),
                array(select realtime.payload(c)
                        from chosen p join realtime.changes c using (position)
                       order by c.position)",
    )
    .bind(after.0)
    .bind(upto.0)
    .bind(rooms.iter().map(|r| &**r).collect::<Vec<&str>>())
    .bind(max_rows)
    .bind(max_bytes)
    .fetch_one(pool)
    .await?;
    Ok(RoomPage {
        pruned_through: Position(pruned),
        last: positions.last().copied().map(Position),
        documents,
    })
}

/// What [`room_page`] read.
#[derive(Debug)]
pub struct RoomPage {
    /// How far the outbox was pruned, in the page's snapshot.
    pub pruned_through: Position,
    /// The position of the page's last row; None when the range holds no
    /// more of the room's changes.
    pub last: Option<Position>,
    /// The rows' documents, in position order.
    pub documents: Vec<String>,
}
