//! An identity provider's JSON Web Key Set (`GATEWAY_JWKS_URL`): fetched at
//! start, cached, refreshed every ten minutes, and refetched when a token
//! names a key id the cache lacks, at most once a minute (a flood of tokens
//! with made-up ids costs the provider one request a minute; the scheduled
//! fetches do not count against it, so a rotation right after a start is
//! picked up at once). A failed fetch
//! keeps the last good keys; `/healthz` `auth.jwks` and
//! `ws_gateway_jwks_*` show it.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Serialize;
use tokio::time::Instant;

/// How long one fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Fetches triggered by unknown key ids are this far apart at least.
pub const REFETCH_AT_MOST_EVERY: Duration = Duration::from_secs(60);
/// A healthy set is refreshed this often, so removed keys stop verifying.
const REFRESH_EVERY: Duration = Duration::from_secs(600);
/// A failing set is retried this often.
const RETRY_EVERY: Duration = Duration::from_secs(60);
/// A key set is a few KiB; anything this large is not one.
const MAX_BODY_BYTES: usize = 1 << 20;

/// A public key that verifies tokens of one algorithm.
#[derive(Clone)]
pub struct VerifyingKey {
    pub algorithm: Algorithm,
    pub key: DecodingKey,
    /// The JWK's `kid`; PEM keys have none and verify whatever a token names.
    pub kid: Option<String>,
}

/// One provider's key set, as last fetched.
pub struct Jwks {
    url: String,
    client: reqwest::Client,
    keys: RwLock<Arc<Vec<VerifyingKey>>>,
    state: Mutex<FetchState>,
    /// One fetch at a time; tokens that need the same fetch wait for it.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct FetchState {
    last_attempt: Option<Instant>,
    /// The last fetch an unknown key id caused.
    last_kid_fetch: Option<Instant>,
    last_success: Option<SystemTime>,
    /// Why the last fetch failed; None once one succeeds.
    last_error: Option<String>,
    fetches_ok: u64,
    fetches_failed: u64,
    /// Bumped by every fetch, so a waiter can tell another one happened.
    generation: u64,
}

/// `/healthz` `auth.jwks` and the `ws_gateway_jwks_*` metrics.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct JwksStatus {
    pub url: String,
    /// `ok`: the last fetch succeeded; `failing`: it failed (the last good
    /// keys, if any, still verify); `pending`: no fetch has finished yet.
    pub state: &'static str,
    pub keys: usize,
    /// Unix seconds of the last successful fetch.
    pub last_success_s: Option<f64>,
    pub last_error: Option<String>,
    pub fetches_ok: u64,
    pub fetches_failed: u64,
}

impl Jwks {
    pub fn new(url: String) -> Jwks {
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .user_agent(concat!("ws-gateway/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("an HTTP client");
        Jwks {
            url,
            client,
            keys: RwLock::new(Arc::new(Vec::new())),
            state: Mutex::new(FetchState::default()),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The last good keys.
    pub fn keys(&self) -> Arc<Vec<VerifyingKey>> {
        Arc::clone(&self.keys.read().expect("jwks lock"))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FetchState> {
        self.state.lock().expect("jwks state lock")
    }

    /// Why the last fetch failed, while it is failing.
    pub fn failure(&self) -> Option<String> {
        self.state().last_error.clone()
    }

    pub fn status(&self) -> JwksStatus {
        let keys = self.keys().len();
        let state = self.state();
        JwksStatus {
            url: self.url.clone(),
            state: match (&state.last_error, state.last_success) {
                (Some(_), _) => "failing",
                (None, Some(_)) => "ok",
                (None, None) => "pending",
            },
            keys,
            last_success_s: state
                .last_success
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs_f64()),
            last_error: state.last_error.clone(),
            fetches_ok: state.fetches_ok,
            fetches_failed: state.fetches_failed,
        }
    }

    /// Fetches now (after any fetch already under way).
    pub async fn refresh(&self) -> Result<usize, String> {
        let _one = self.fetching.lock().await;
        self.fetch().await
    }

    /// A token names a key id the cache lacks: refetch, unless a fetch ran
    /// less than [`REFETCH_AT_MOST_EVERY`] ago. True when the keys may have
    /// changed since the caller looked (this fetch, or another one it
    /// waited for, succeeded).
    pub async fn refresh_for_unknown_kid(&self) -> bool {
        let seen = self.state().generation;
        let _one = self.fetching.lock().await;
        let (generation, recent) = {
            let state = self.state();
            let recent = state
                .last_kid_fetch
                .is_some_and(|at| at.elapsed() < REFETCH_AT_MOST_EVERY);
            (state.generation, recent)
        };
        if generation != seen {
            return self.state().last_error.is_none();
        }
        if recent {
            return false;
        }
        self.state().last_kid_fetch = Some(Instant::now());
        self.fetch().await.is_ok()
    }

    /// One fetch; the caller holds `fetching`.
    async fn fetch(&self) -> Result<usize, String> {
        self.state().last_attempt = Some(Instant::now());
        let outcome = self.download().await;
        let mut state = self.state();
        state.generation += 1;
        match outcome {
            Ok(keys) => {
                let n = keys.len();
                *self.keys.write().expect("jwks lock") = Arc::new(keys);
                if state.last_error.take().is_some() {
                    tracing::info!(url = %self.url, keys = n, "JWKS fetched again");
                }
                state.last_success = Some(SystemTime::now());
                state.fetches_ok += 1;
                Ok(n)
            }
            Err(error) => {
                if state.last_error.is_none() {
                    tracing::warn!(
                        url = %self.url,
                        %error,
                        keys_kept = self.keys().len(),
                        "cannot fetch the JWKS; the last good keys stay in use"
                    );
                }
                state.last_error = Some(error.clone());
                state.fetches_failed += 1;
                Err(error)
            }
        }
    }

    async fn download(&self) -> Result<Vec<VerifyingKey>, String> {
        let mut response = self
            .client
            .get(&self.url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| request_error(&e))?;
        if !response.status().is_success() {
            return Err(format!("the server answered {}", response.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| request_error(&e))? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_BODY_BYTES {
                return Err(format!("the answer is over {MAX_BODY_BYTES} bytes: not a key set"));
            }
        }
        parse_key_set(&body)
    }

    /// How long until the next scheduled refresh: ten minutes after the
    /// last fetch while healthy, a minute while failing, now if none ran.
    pub fn next_refresh_in(&self) -> Duration {
        let state = self.state();
        let every = if state.last_error.is_some() || state.last_success.is_none() {
            RETRY_EVERY
        } else {
            REFRESH_EVERY
        };
        state
            .last_attempt
            .map_or(Duration::ZERO, |at| every.saturating_sub(at.elapsed()))
    }
}

/// What went wrong with a request, without the library's type names.
fn request_error(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        format!("no answer within {FETCH_TIMEOUT:?}")
    } else if e.is_connect() {
        "cannot connect".to_owned()
    } else {
        "the request failed".to_owned()
    };
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The usable signing keys of a JWKS document. Keys for encryption, of
/// unknown types or algorithms are skipped; a set with none left is refused.
pub fn parse_key_set(body: &[u8]) -> Result<Vec<VerifyingKey>, String> {
    #[derive(serde::Deserialize)]
    struct Set {
        keys: Vec<serde_json::Value>,
    }
    let set: Set = serde_json::from_slice(body).map_err(|e| format!("not a JSON Web Key Set ({e})"))?;
    let keys: Vec<VerifyingKey> = set
        .keys
        .into_iter()
        .filter_map(|value| serde_json::from_value::<Jwk>(value).ok())
        .filter_map(|jwk| verifying_key(&jwk))
        .collect();
    if keys.is_empty() {
        return Err("the key set holds no signing key this gateway can use (RSA, EC P-256/P-384, Ed25519)".into());
    }
    Ok(keys)
}

fn verifying_key(jwk: &Jwk) -> Option<VerifyingKey> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => Algorithm::EdDSA,
        // Shared secrets do not belong in a published key set.
        _ => return None,
    };
    let algorithm = match jwk.common.key_algorithm {
        Some(declared) => declared.to_string().parse().ok()?,
        None => implied,
    };
    if matches!(algorithm, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(VerifyingKey {
        algorithm,
        key,
        kid: jwk.common.key_id.clone(),
    })
}
