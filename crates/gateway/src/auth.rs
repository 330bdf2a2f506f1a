//! Who a connection is and which rooms it may read: `GATEWAY_AUTH=none`
//! (local development, every room) or JWTs whose `rooms` claim lists room
//! names and `prefix:*` patterns. [`Authenticator::authenticate`] is the one
//! entry point: the signature is checked against the keys (`keys`: HS256
//! secrets, PEM public keys, an identity provider's JWKS, fetched by `jwks`),
//! then the claims against SPEC section 4 ([`check_claims`]).

use std::collections::HashSet;

use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use serde_json::Number;

use crate::config::Auth;

/// Rooms starting with this are the gateway's own (the probe's): no grant,
/// not even `*`, and no `realtime.authorize` answer reaches them.
pub const RESERVED_ROOM_PREFIX: &str = "__";

/// The latest `exp` accepted, 9999-12-31T23:59:59Z: any date a token issuer
/// may write is held to exactly; later ones are refused as malformed.
pub const MAX_EXP: u64 = 253_402_300_799;

mod jwks;
mod keys;

pub(crate) use keys::Keys;

/// The rooms a connection may subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grants {
    All,
    Rooms {
        exact: HashSet<String>,
        /// `project:*` is stored as `project:`.
        prefixes: Vec<String>,
    },
    /// The gateway's own probe: its room alone, which no token grants.
    Internal(String),
}

impl Grants {
    /// No room at all.
    pub fn none() -> Grants {
        Grants::Rooms {
            exact: HashSet::new(),
            prefixes: Vec::new(),
        }
    }

    pub fn from_patterns(patterns: &[String]) -> Grants {
        let mut exact = HashSet::new();
        let mut prefixes = Vec::new();
        for pattern in patterns {
            match pattern.strip_suffix('*') {
                Some("") => return Grants::All,
                Some(prefix) => prefixes.push(prefix.to_owned()),
                None => {
                    exact.insert(pattern.clone());
                }
            }
        }
        Grants::Rooms { exact, prefixes }
    }

    pub fn allows(&self, room: &str) -> bool {
        if is_reserved_room(room) {
            return matches!(self, Grants::Internal(own) if own == room);
        }
        match self {
            Grants::All => true,
            Grants::Rooms { exact, prefixes } => {
                exact.contains(room) || prefixes.iter().any(|p| room.starts_with(p.as_str()))
            }
            Grants::Internal(_) => false,
        }
    }
}

/// Whether `room` is one of the gateway's own.
pub fn is_reserved_room(room: &str) -> bool {
    room.starts_with(RESERVED_ROOM_PREFIX)
}

/// An authenticated connection.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The token's `sub`: required of every token; None only without
    /// authentication (`GATEWAY_AUTH=none`).
    pub subject: Option<String>,
    pub grants: Grants,
    /// The rooms it may publish events to (`POST /publish`): the token's
    /// `publish` claim, none without one.
    pub publish: Grants,
    /// Token expiry, seconds since the Unix epoch (at most [`MAX_EXP`]).
    pub expires_at: Option<u64>,
}

impl Identity {
    /// The built-in probe's identity (it presents a ticket, not a token).
    pub fn probe(room: String) -> Identity {
        Identity {
            subject: Some("ws-gateway-probe".to_owned()),
            grants: Grants::Internal(room),
            publish: Grants::none(),
            expires_at: None,
        }
    }
}

/// Why a token was refused; the text goes back to the client, in plain
/// words (never a library's error name).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing token: pass ?token= or an Authorization: Bearer header")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet: its nbf is in the future")]
    NotYetValid,
    #[error("token issued in the future (iat): the issuer's clock is ahead of the gateway's")]
    IssuedInFuture,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token has no {0:?} claim: \"sub\" and \"exp\" are required")]
    MissingClaim(&'static str),
    /// Signed with an algorithm no configured key verifies.
    #[error("token is signed with {got}; this gateway accepts {accepted}")]
    Algorithm { got: String, accepted: String },
    /// No configured key has the token's `kid`, even after refetching the key set.
    #[error("{0}")]
    UnknownKey(String),
    #[error("malformed token: {0}")]
    Malformed(String),
}

/// The claims the gateway reads; the times are JSON numbers (NumericDate
/// may carry a fraction).
#[derive(Deserialize)]
pub struct Claims {
    pub sub: Option<String>,
    pub exp: Option<Number>,
    pub nbf: Option<Number>,
    pub iat: Option<Number>,
    #[serde(default)]
    pub rooms: Vec<String>,
    /// Rooms (or `prefix:*` patterns) the bearer may publish events to.
    #[serde(default)]
    pub publish: Vec<String>,
}

/// Checks `claims` at `now` (seconds since the Unix epoch) with `leeway`
/// seconds of clock skew either way: `sub` and `exp` present, `exp` not
/// passed (a token is refused on or after `exp` + leeway) and not after year
/// 9999, `nbf` (if any) reached, `iat` (if any) not ahead of us.
pub fn check_claims(claims: Claims, now: u64, leeway: u64) -> Result<Identity, AuthError> {
    let subject = claims
        .sub
        .filter(|s| !s.is_empty())
        .ok_or(AuthError::MissingClaim("sub"))?;
    let exp = claims.exp.ok_or(AuthError::MissingClaim("exp"))?;
    let exp = seconds("exp", &exp)?;
    if exp > MAX_EXP {
        return Err(AuthError::Malformed(format!(
            "exp {exp} is after 9999-12-31T23:59:59Z ({MAX_EXP})"
        )));
    }
    if now >= exp.saturating_add(leeway) {
        return Err(AuthError::Expired);
    }
    if let Some(nbf) = &claims.nbf
        && seconds("nbf", nbf)? > now.saturating_add(leeway)
    {
        return Err(AuthError::NotYetValid);
    }
    if let Some(iat) = &claims.iat
        && seconds("iat", iat)? > now.saturating_add(leeway)
    {
        return Err(AuthError::IssuedInFuture);
    }
    Ok(Identity {
        subject: Some(subject),
        grants: Grants::from_patterns(&claims.rooms),
        publish: Grants::from_patterns(&claims.publish),
        expires_at: Some(exp),
    })
}

/// A NumericDate as whole seconds (a fraction is dropped; before 1970 is 0).
fn seconds(claim: &str, value: &Number) -> Result<u64, AuthError> {
    if let Some(s) = value.as_u64() {
        return Ok(s);
    }
    match value.as_f64() {
        Some(s) if s.is_finite() && s < 0.0 => Ok(0),
        // Beyond u64 saturates, and is then refused as past year 9999.
        Some(s) if s.is_finite() => Ok(s as u64),
        _ => Err(AuthError::Malformed(format!("{claim} is not a number of seconds"))),
    }
}

/// Checks tokens: `None` lets every connection in (`GATEWAY_AUTH=none`);
/// otherwise [`Authenticator::authenticate`] verifies the signature with the
/// configured keys (`keys`), then the claims.
pub struct Authenticator {
    keys: Option<Keys>,
    leeway_s: u64,
}

impl Authenticator {
    pub fn new(auth: &Auth, leeway_s: u64) -> Authenticator {
        Authenticator {
            keys: match auth {
                Auth::None => None,
                Auth::Jwt(keys) => Some(Keys::new(keys)),
            },
            leeway_s,
        }
    }

    /// The configured keys; `None` with `GATEWAY_AUTH=none`.
    pub(crate) fn keys(&self) -> Option<&Keys> {
        self.keys.as_ref()
    }

    /// What the library checks: the signature (and the algorithm) only;
    /// every claim is [`check_claims`]'s.
    fn validation(algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation
    }

    /// Who presents `token`, and which rooms it grants: the one entry point
    /// for the upgrade and for in-band `auth`. It may wait for a refetch of
    /// the JWKS when the token names a key id not seen yet.
    pub async fn authenticate(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        let Some(keys) = &self.keys else {
            return Ok(Identity {
                subject: None,
                grants: Grants::All,
                publish: Grants::All,
                expires_at: None,
            });
        };
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let claims: Claims = keys.verify(token, Authenticator::validation).await?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        check_claims(claims, now, self.leeway_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_grant_exact_rooms_and_prefixes() {
        let grants = Grants::from_patterns(&["project:42".into(), "task:*".into()]);
        assert!(grants.allows("project:42"));
        assert!(!grants.allows("project:4"));
        assert!(!grants.allows("project:420"));
        assert!(grants.allows("task:7"));
        assert!(!grants.allows("tasks"));
        assert_eq!(Grants::from_patterns(&["*".into()]), Grants::All);
    }

    #[test]
    fn no_grant_reaches_the_gateways_own_rooms() {
        for patterns in [vec!["*"], vec!["__*"], vec!["__probe:*"], vec!["__probe:x"]] {
            let patterns: Vec<String> = patterns.into_iter().map(String::from).collect();
            let grants = Grants::from_patterns(&patterns);
            assert!(!grants.allows("__probe:x"), "{patterns:?}");
        }
        let probe = Identity::probe("__probe:x".into()).grants;
        assert!(probe.allows("__probe:x"));
        assert!(!probe.allows("__probe:y") && !probe.allows("project:1"));
    }

    fn claims(value: serde_json::Value) -> Claims {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn claims_are_checked_with_the_leeway() {
        use serde_json::json;
        let now = 1_800_000_000;
        let check = |value: serde_json::Value| check_claims(claims(value), now, 5);
        let ok = check(json!({"sub": "u", "exp": now + 1})).unwrap();
        assert_eq!((ok.subject.as_deref(), ok.expires_at), (Some("u"), Some(now + 1)));
        assert_eq!(
            check(json!({"exp": now + 60})).unwrap_err(),
            AuthError::MissingClaim("sub")
        );
        assert_eq!(
            check(json!({"sub": "", "exp": now + 60})).unwrap_err(),
            AuthError::MissingClaim("sub")
        );
        assert_eq!(check(json!({"sub": "u"})).unwrap_err(), AuthError::MissingClaim("exp"));
        // Expired within the leeway: accepted, and held to exp (the session
        // adds the leeway); past it, refused.
        assert_eq!(
            check(json!({"sub": "u", "exp": now - 4})).unwrap().expires_at,
            Some(now - 4)
        );
        assert_eq!(
            check(json!({"sub": "u", "exp": now - 5})).unwrap_err(),
            AuthError::Expired
        );
        assert_eq!(check(json!({"sub": "u", "exp": -1})).unwrap_err(), AuthError::Expired);
        // nbf and iat: honoured with the leeway.
        assert!(check(json!({"sub": "u", "exp": now + 60, "nbf": now + 5, "iat": now + 5})).is_ok());
        assert_eq!(
            check(json!({"sub": "u", "exp": now + 60, "nbf": now + 3600})).unwrap_err(),
            AuthError::NotYetValid
        );
        assert_eq!(
            check(json!({"sub": "u", "exp": now + 60, "iat": now + 60})).unwrap_err(),
            AuthError::IssuedInFuture
        );
        // Any exp up to the end of year 9999, exactly; a fraction is dropped.
        assert_eq!(
            check(json!({"sub": "u", "exp": MAX_EXP})).unwrap().expires_at,
            Some(MAX_EXP)
        );
        assert_eq!(
            check(json!({"sub": "u", "exp": (now + 60) as f64 + 0.5}))
                .unwrap()
                .expires_at,
            Some(now + 60)
        );
        for past_9999 in [json!(MAX_EXP + 1), json!(10_000_000_000_000u64), json!(1e300)] {
            assert!(
                matches!(check(json!({"sub": "u", "exp": past_9999})).unwrap_err(), AuthError::Malformed(m) if m.contains("9999")),
                "{past_9999}"
            );
        }
    }

    #[tokio::test]
    async fn jwt_tokens_are_checked() {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let secret = "a-secret-of-at-least-thirty-two-bytes!";
        let auth = Authenticator::new(&Auth::hs256(secret), 0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let token = |exp: u64, key: &str| {
            let claims = serde_json::json!({"sub": "u1", "exp": exp, "rooms": ["project:*"]});
            encode(&Header::default(), &claims, &EncodingKey::from_secret(key.as_bytes())).unwrap()
        };
        let id = auth.authenticate(Some(&token(now + 60, secret))).await.unwrap();
        assert_eq!(id.subject.as_deref(), Some("u1"));
        assert!(id.grants.allows("project:1"));
        assert_eq!(auth.authenticate(None).await.unwrap_err(), AuthError::Missing);
        assert_eq!(
            auth.authenticate(Some(&token(now - 60, secret))).await.unwrap_err(),
            AuthError::Expired
        );
        assert_eq!(
            auth.authenticate(Some(&token(now + 60, "another-secret-of-thirty-two-bytes!!")))
                .await
                .unwrap_err(),
            AuthError::BadSignature
        );
        let garbage = auth.authenticate(Some("garbage")).await.unwrap_err();
        assert_eq!(
            garbage.to_string(),
            "malformed token: expected three base64url parts separated by dots (header.claims.signature)"
        );
    }

    /// Several secrets: a token signed with any of them verifies (rotation).
    #[tokio::test]
    async fn any_of_several_secrets_verifies() {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let old = "the-old-secret-of-at-least-thirty-two-bytes";
        let new = "the-new-secret-of-at-least-thirty-two-bytes";
        let auth = Authenticator::new(
            &Auth::Jwt(crate::config::JwtKeys {
                secrets: vec![new.into(), old.into()],
                ..Default::default()
            }),
            0,
        );
        let claims = serde_json::json!({"sub": "u1", "exp": 4_102_444_800u64});
        for secret in [old, new] {
            let token = encode(
                &Header::default(),
                &claims,
                &EncodingKey::from_secret(secret.as_bytes()),
            )
            .unwrap();
            assert!(auth.authenticate(Some(&token)).await.is_ok(), "{secret}");
        }
        let other = encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(b"a-third-secret-nobody-configured-here!!"),
        )
        .unwrap();
        assert_eq!(
            auth.authenticate(Some(&other)).await.unwrap_err(),
            AuthError::BadSignature
        );
        // HS512 with a configured secret: the message says what is expected.
        let hs512 = encode(
            &Header::new(Algorithm::HS512),
            &claims,
            &EncodingKey::from_secret(new.as_bytes()),
        )
        .unwrap();
        assert_eq!(
            auth.authenticate(Some(&hs512)).await.unwrap_err().to_string(),
            "token is signed with HS512; this gateway accepts HS256"
        );
    }
}
