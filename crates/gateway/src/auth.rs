//! Who a connection is and which rooms it may read: `GATEWAY_AUTH=none`
//! (local development, every room) or HS256 JWTs whose `rooms` claim lists
//! room names and `prefix:*` patterns.

use std::collections::HashSet;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::Auth;

/// The rooms a connection may subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grants {
    All,
    Rooms {
        exact: HashSet<String>,
        /// `project:*` is stored as `project:`.
        prefixes: Vec<String>,
    },
}

impl Grants {
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
        match self {
            Grants::All => true,
            Grants::Rooms { exact, prefixes } => {
                exact.contains(room) || prefixes.iter().any(|p| room.starts_with(p.as_str()))
            }
        }
    }
}

/// An authenticated connection.
#[derive(Debug, Clone)]
pub struct Identity {
    pub subject: Option<String>,
    pub grants: Grants,
    /// Token expiry, seconds since the Unix epoch.
    pub expires_at: Option<u64>,
}

/// Why a token was refused; the text goes back to the client.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing token: pass ?token= or an Authorization: Bearer header")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("malformed token: {0}")]
    Malformed(String),
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: u64,
    #[serde(default)]
    rooms: Vec<String>,
}

pub enum Authenticator {
    None,
    /// Boxed: the validation rules are large, and `None` need not pay for them.
    Jwt {
        key: DecodingKey,
        validation: Box<Validation>,
    },
}

impl Authenticator {
    pub fn new(auth: &Auth, leeway_s: u64) -> Authenticator {
        match auth {
            Auth::None => Authenticator::None,
            Auth::Jwt { secret } => {
                let mut validation = Validation::new(Algorithm::HS256);
                validation.leeway = leeway_s;
                validation.set_required_spec_claims(&["exp"]);
                validation.validate_aud = false;
                Authenticator::Jwt {
                    key: DecodingKey::from_secret(secret.expose().as_bytes()),
                    validation: Box::new(validation),
                }
            }
        }
    }

    pub fn authenticate(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        match self {
            Authenticator::None => Ok(Identity {
                subject: None,
                grants: Grants::All,
                expires_at: None,
            }),
            Authenticator::Jwt { key, validation } => {
                let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
                let data = jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|e| {
                    use jsonwebtoken::errors::ErrorKind;
                    match e.kind() {
                        ErrorKind::ExpiredSignature => AuthError::Expired,
                        ErrorKind::InvalidSignature => AuthError::BadSignature,
                        _ => AuthError::Malformed(e.to_string()),
                    }
                })?;
                Ok(Identity {
                    subject: data.claims.sub,
                    grants: Grants::from_patterns(&data.claims.rooms),
                    expires_at: Some(data.claims.exp),
                })
            }
        }
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
    fn jwt_tokens_are_checked() {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let secret = "a-secret-of-at-least-thirty-two-bytes!";
        let auth = Authenticator::new(&Auth::Jwt { secret: secret.into() }, 0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let token = |exp: u64, key: &str| {
            let claims = serde_json::json!({"sub": "u1", "exp": exp, "rooms": ["project:*"]});
            encode(&Header::default(), &claims, &EncodingKey::from_secret(key.as_bytes())).unwrap()
        };
        let id = auth.authenticate(Some(&token(now + 60, secret))).unwrap();
        assert_eq!(id.subject.as_deref(), Some("u1"));
        assert!(id.grants.allows("project:1"));
        assert_eq!(auth.authenticate(None).unwrap_err(), AuthError::Missing);
        assert_eq!(
            auth.authenticate(Some(&token(now - 60, secret))).unwrap_err(),
            AuthError::Expired
        );
        assert_eq!(
            auth.authenticate(Some(&token(now + 60, "another-secret-of-thirty-two-bytes!!")))
                .unwrap_err(),
            AuthError::BadSignature
        );
        assert!(matches!(
            auth.authenticate(Some("garbage")).unwrap_err(),
            AuthError::Malformed(_)
        ));
    }
}
