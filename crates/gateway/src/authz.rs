//! Authorization by the database, for rules that live in ConstructTrack's
//! tables: when `realtime.authorize(sub text, room text) returns boolean`
//! exists, it decides rooms the token does not grant. Answers are cached
//! (quick_cache, `GATEWAY_CACHE_CAPACITY` entries, each stored with its
//! expiry, `GATEWAY_CACHE_TTL_MS`), so a reconnect storm does not become a
//! query storm.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quick_cache::sync::Cache;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::db;

/// How long "the function does not exist" is believed before asking again.
const FUNCTION_RECHECK: Duration = Duration::from_secs(30);
/// The longest one check may take, waiting for its turn and a pooled
/// connection included: past it the subscribe is answered
/// `authorization_unavailable` (the client may retry) instead of holding
/// its connection, and everyone behind it, any longer.
pub const AUTHORIZE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a room could not be checked (not: why it was refused).
#[derive(Debug, thiserror::Error)]
#[error("authorization check failed: {0}")]
pub struct AuthzError(String);

pub struct Authorizer {
    pool: PgPool,
    cache: Cache<(String, String), (bool, Instant)>,
    /// Whether `realtime.authorize` exists, and when that was last checked.
    function: Mutex<Option<(bool, Instant)>>,
    /// Checks running at once: half the clients' pool, so a slow
    /// `realtime.authorize` leaves connections for replays. Each connection
    /// asks one question at a time (its session handles one message at a
    /// time), so one client holds at most one turn.
    turns: Semaphore,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Checks that did not finish within [`AUTHORIZE_TIMEOUT`].
    pub timeouts: AtomicU64,
}

/// `/healthz` `cache`.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    #[serde(rename = "hitRate")]
    pub hit_rate: f64,
    #[serde(rename = "totalEntries")]
    pub total_entries: usize,
}

impl Authorizer {
    /// `pool_size`: the connections `pool` has (half of them may be
    /// taken by checks at once).
    pub fn new(pool: PgPool, capacity: usize, pool_size: usize) -> Authorizer {
        Authorizer {
            pool,
            cache: Cache::new(capacity.max(1)),
            function: Mutex::new(None),
            turns: Semaphore::new((pool_size / 2).max(1)),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
        }
    }

    /// May `subject` read `room`? False when the function does not exist.
    /// `ttl` None: the cache feature is off, ask every time.
    pub async fn allows(&self, subject: &str, room: &str, ttl: Option<Duration>) -> Result<bool, AuthzError> {
        let now = Instant::now();
        let key = (subject.to_owned(), room.to_owned());
        if ttl.is_some()
            && let Some((allowed, expires)) = self.cache.get(&key)
            && expires > now
        {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(allowed);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(AUTHORIZE_TIMEOUT, self.ask(subject, room, key, ttl, now)).await {
            Ok(answer) => answer,
            Err(_) => {
                self.timeouts.fetch_add(1, Ordering::Relaxed);
                Err(AuthzError(format!(
                    "realtime.authorize did not answer within {AUTHORIZE_TIMEOUT:?}"
                )))
            }
        }
    }

    /// A cache miss: waits for a turn, then asks the database.
    async fn ask(
        &self,
        subject: &str,
        room: &str,
        key: (String, String),
        ttl: Option<Duration>,
        now: Instant,
    ) -> Result<bool, AuthzError> {
        let _turn = self.turns.acquire().await.expect("the semaphore is never closed");
        if !self.function_exists(now).await? {
            return Ok(false);
        }
        let allowed = match db::authorize(&self.pool, subject, room).await {
            Ok(answer) => answer.unwrap_or(false),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42883") => {
                // Dropped since we looked.
                *self.function.lock().expect("authorize lock") = Some((false, now));
                false
            }
            Err(e) => return Err(AuthzError(e.to_string())),
        };
        if let Some(ttl) = ttl {
            self.cache.insert(key, (allowed, now + ttl));
        }
        Ok(allowed)
    }

    async fn function_exists(&self, now: Instant) -> Result<bool, AuthzError> {
        if let Some((exists, checked)) = *self.function.lock().expect("authorize lock")
            && now.duration_since(checked) < FUNCTION_RECHECK
        {
            return Ok(exists);
        }
        let exists = db::authorize_exists(&self.pool)
            .await
            .map_err(|e| AuthzError(e.to_string()))?;
        *self.function.lock().expect("authorize lock") = Some((exists, now));
        Ok(exists)
    }

    pub fn stats(&self) -> CacheStats {
        let hits = self.hits.load(Ordering::Relaxed);
        let misses = self.misses.load(Ordering::Relaxed);
        CacheStats {
            hits,
            misses,
            hit_rate: if hits + misses == 0 {
                0.0
            } else {
                hits as f64 / (hits + misses) as f64
            },
            total_entries: self.cache.len(),
        }
    }
}
