//! Where the client's token comes from, and when to ask for the next one:
//! a fixed string, or a function asked on every connect and again before
//! the token's `exp` (then sent in band, so the connection never hits 4001).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;

/// What a token function may fail with.
pub type TokenError = Box<dyn std::error::Error + Send + Sync>;

type TokenFuture = Pin<Box<dyn Future<Output = Result<String, TokenError>> + Send>>;

/// The client's token.
#[derive(Clone, Default)]
pub enum Token {
    /// No token (a gateway with `GATEWAY_AUTH=none`).
    #[default]
    None,
    /// The same token on every connect; it cannot be refreshed.
    Fixed(String),
    /// Asked on every connect and before each token's `exp`.
    Function(Arc<dyn Fn() -> TokenFuture + Send + Sync>),
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself: it is a credential.
        f.write_str(match self {
            Token::None => "Token::None",
            Token::Fixed(_) => "Token::Fixed(..)",
            Token::Function(_) => "Token::Function(..)",
        })
    }
}

impl Token {
    pub fn function<F, Fut>(f: F) -> Token
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, TokenError>> + Send + 'static,
    {
        Token::Function(Arc::new(move || Box::pin(f())))
    }

    /// The token to connect (or refresh) with.
    pub(crate) async fn get(&self) -> Result<Option<String>, TokenError> {
        match self {
            Token::None => Ok(None),
            Token::Fixed(token) => Ok(Some(token.clone())),
            Token::Function(f) => f().await.map(Some),
        }
    }

    pub(crate) fn refreshable(&self) -> bool {
        matches!(self, Token::Function(_))
    }
}

/// Never refresh more often than this (a function that keeps handing back
/// the same nearly expired token must not spin).
const MIN_REFRESH: Duration = Duration::from_millis(500);
const MAX_REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// `exp` and `iat` (seconds since the epoch) from a JWT's payload.
fn token_times(token: &str) -> Option<(f64, Option<f64>)> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some((claims.get("exp")?.as_f64()?, claims.get("iat").and_then(|v| v.as_f64())))
}

/// How long to wait before refreshing `token` in band: its lifetime, read
/// from the token (with `iat`, so a wrong local clock does not matter),
/// less a third of it (at most a minute) as margin. `None`: not a JWT with
/// an `exp`, nothing to refresh.
pub(crate) fn refresh_delay(token: &str, now: SystemTime) -> Option<Duration> {
    let (exp, iat) = token_times(token)?;
    let now_s = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    let until_exp = exp - now_s;
    let lifetime = iat.map_or(until_exp, |iat| exp - iat);
    let left = if until_exp > 0.0 {
        until_exp.min(if lifetime > 0.0 { lifetime } else { until_exp })
    } else {
        lifetime.max(0.0)
    };
    let margin = (left / 3.0).min(MAX_REFRESH_MARGIN.as_secs_f64());
    Some(Duration::from_secs_f64((left - margin).max(0.0)).max(MIN_REFRESH))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: serde_json::Value) -> String {
        let part = |v: &serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!("{}.{}.sig", part(&serde_json::json!({"alg": "HS256"})), part(&claims))
    }

    #[test]
    fn refreshes_a_third_of_the_lifetime_before_exp_at_most_a_minute() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let three_s = jwt(serde_json::json!({"iat": 1_000_000, "exp": 1_000_003}));
        assert_eq!(refresh_delay(&three_s, now), Some(Duration::from_secs(2)));
        let hour = jwt(serde_json::json!({"iat": 1_000_000, "exp": 1_003_600}));
        assert_eq!(refresh_delay(&hour, now), Some(Duration::from_secs(3540)));
        // A local clock an hour fast: iat says how long the token lives.
        let skewed = UNIX_EPOCH + Duration::from_secs(1_003_600);
        assert_eq!(refresh_delay(&three_s, skewed), Some(Duration::from_secs(2)));
        let no_exp = jwt(serde_json::json!({"sub": "x"}));
        assert_eq!(refresh_delay(&no_exp, now), None);
        assert_eq!(refresh_delay("not a jwt", now), None);
        let spent = jwt(serde_json::json!({"exp": 999_000}));
        assert_eq!(refresh_delay(&spent, now), Some(MIN_REFRESH));
    }
}
