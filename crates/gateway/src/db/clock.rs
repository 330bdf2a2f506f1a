//! The database's clock, for the offset estimate (`telemetry::clock`).

use sqlx::PgConnection;

const CLOCK_QUERY: &str = "select (extract(epoch from clock_timestamp()) * 1000000)::bigint";

/// `clock_timestamp()` on `conn`, microseconds since the Unix epoch. One
/// round trip, on a connection the caller holds, so it can time it.
pub async fn clock_now_us(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(CLOCK_QUERY).fetch_one(conn).await
}
