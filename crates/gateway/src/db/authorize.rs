//! `realtime.authorize(sub text, room text) returns boolean`: the database's
//! say on rooms a token does not grant (the cache is `crate::authz`).

use sqlx::PgPool;

/// Whether the application defined `realtime.authorize(text, text)`.
pub async fn authorize_exists(pool: &PgPool) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("select to_regprocedure('realtime.authorize(text, text)') is not null")
        .fetch_one(pool)
        .await
}

/// `realtime.authorize(subject, room)`; NULL is `None`.
pub async fn authorize(pool: &PgPool, subject: &str, room: &str) -> Result<Option<bool>, sqlx::Error> {
    sqlx::query_scalar::<_, Option<bool>>("select realtime.authorize($1, $2)")
        .bind(subject)
        .bind(room)
        .fetch_one(pool)
        .await
}
