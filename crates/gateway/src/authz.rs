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
use tokio::time::Instant;

use crate::db;

/// How long "the function does not exist" is believed before asking again.
const FUNCTION_RECHECK: Duration = Duration::from_secs(30);
/// The longest an authorization query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a room could not be checked (not: why it was refused).
#[derive(Debug, thiserror::Error)]
#[error("authorization check failed: {0}")]
pub struct AuthzError(String);

pub struct Authorizer {
    pool: PgPool,
    cache: Cache<(String, String), (bool, Instant)>,
    /// Whether `realtime.authorize` exists, and when that was last checked.
    function: Mutex<Option<(bool, Instant)>>,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
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
    pub fn new(pool: PgPool, capacity: usize) -> Authorizer {
        Authorizer {
            pool,
            cache: Cache::new(capacity.max(1)),
            function: Mutex::new(None),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
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
        if !self.function_exists(now).await? {
            return Ok(false);
        }
        let query = db::authorize(&self.pool, subject, room);
        let allowed = match tokio::time::timeout(QUERY_TIMEOUT, query).await {
            Ok(Ok(answer)) => answer.unwrap_or(false),
            Ok(Err(sqlx::Error::Database(e))) if e.code().as_deref() == Some("42883") => {
                // Dropped since we looked.
                *self.function.lock().expect("authorize lock") = Some((false, now));
                false
            }
            Ok(Err(e)) => return Err(AuthzError(e.to_string())),
            Err(_) => {
                return Err(AuthzError("realtime.authorize did not answer in time".into()));
            }
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
