//! The keys that verify a token's signature: HS256 secrets, PEM public keys
//! and the keys of an identity provider's JWKS. A token verifies if any key
//! of its algorithm does (several secrets: rotation without a gap); a token
//! whose `kid` the cached JWKS lacks makes it refetch, at most once a
//! minute. A reload (SIGHUP) replaces the set.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use super::AuthError;
use super::jwks::{Jwks, VerifyingKey};
use crate::config::JwtKeys;

/// The configured keys, replaceable as a whole on reload.
pub struct Keys {
    current: RwLock<Arc<KeySet>>,
}

/// One version of the configuration's keys.
pub(crate) struct KeySet {
    /// HS256 secrets, in the order configured.
    secrets: Vec<DecodingKey>,
    /// From `GATEWAY_JWT_PUBLIC_KEYS`: they verify a token whatever its `kid`.
    public: Vec<VerifyingKey>,
    jwks: Option<Arc<Jwks>>,
    /// What was configured, to tell on reload whether anything changed.
    source: JwtKeys,
}

impl KeySet {
    fn new(source: &JwtKeys, previous: Option<&KeySet>) -> KeySet {
        let public = source
            .public_keys
            .iter()
            .filter_map(|file| {
                // Checked when the settings were read; a file that no longer
                // parses would have been refused there.
                let key = match file.algorithm {
                    Algorithm::RS256 => DecodingKey::from_rsa_pem(file.pem.as_bytes()),
                    Algorithm::EdDSA => DecodingKey::from_ed_pem(file.pem.as_bytes()),
                    _ => DecodingKey::from_ec_pem(file.pem.as_bytes()),
                };
                key.ok().map(|key| VerifyingKey {
                    algorithm: file.algorithm,
                    key,
                    kid: None,
                })
            })
            .collect();
        // The same URL keeps its cache and its fetch state across reloads.
        let jwks = source.jwks_url.as_ref().map(|url| {
            previous
                .and_then(|p| p.jwks.as_ref())
                .filter(|j| j.url() == url)
                .cloned()
                .unwrap_or_else(|| Arc::new(Jwks::new(url.clone())))
        });
        KeySet {
            secrets: source
                .secrets
                .iter()
                .map(|s| DecodingKey::from_secret(s.expose().as_bytes()))
                .collect(),
            public,
            jwks,
            source: source.clone(),
        }
    }

    /// The algorithms some key verifies, for the refusal of another.
    fn accepted(&self) -> Vec<Algorithm> {
        let mut accepted = Vec::new();
        if !self.secrets.is_empty() {
            accepted.push(Algorithm::HS256);
        }
        let jwks_keys = self.jwks.as_ref().map(|j| j.keys()).unwrap_or_default();
        for key in self.public.iter().chain(jwks_keys.iter()) {
            if !accepted.contains(&key.algorithm) {
                accepted.push(key.algorithm);
            }
        }
        // Before the first successful fetch, what an identity provider signs with.
        if self.jwks.as_ref().is_some_and(|j| j.keys().is_empty()) {
            for algorithm in [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA] {
                if !accepted.contains(&algorithm) {
                    accepted.push(algorithm);
                }
            }
        }
        accepted
    }

    /// The keys that may have signed a token of `algorithm` with `kid`.
    fn candidates(&self, algorithm: Algorithm, kid: Option<&str>, jwks_keys: &[VerifyingKey]) -> Vec<DecodingKey> {
        if algorithm == Algorithm::HS256 {
            return self.secrets.clone();
        }
        let from_jwks = jwks_keys
            .iter()
            .filter(|k| k.algorithm == algorithm && (kid.is_none() || k.kid.as_deref() == kid));
        self.public
            .iter()
            .filter(|k| k.algorithm == algorithm)
            .chain(from_jwks)
            .map(|k| k.key.clone())
            .collect()
    }
}

impl Keys {
    pub fn new(source: &JwtKeys) -> Keys {
        Keys {
            current: RwLock::new(Arc::new(KeySet::new(source, None))),
        }
    }

    fn current(&self) -> Arc<KeySet> {
        Arc::clone(&self.current.read().expect("keys lock"))
    }

    /// Replaces the keys (a reload); a JWKS at the same URL keeps its cache.
    /// Returns whether anything changed.
    pub fn reload(&self, source: &JwtKeys) -> bool {
        let current = self.current();
        if current.source == *source {
            return false;
        }
        let next = KeySet::new(source, Some(&current));
        *self.current.write().expect("keys lock") = Arc::new(next);
        true
    }

    /// The JWKS the current keys include, if any.
    pub fn jwks(&self) -> Option<Arc<Jwks>> {
        self.current().jwks.clone()
    }

    /// Keeps the JWKS (whichever the current keys include) fresh until
    /// shutdown: see [`Jwks::next_refresh_in`].
    pub async fn keep_jwks_fresh(&self, shutdown: &CancellationToken) {
        loop {
            // Looked up each turn: a reload may add, drop or replace it.
            let wait = self
                .jwks()
                .map_or(Duration::from_secs(60), |jwks| jwks.next_refresh_in())
                .min(Duration::from_secs(60));
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            if let Some(jwks) = self.jwks()
                && jwks.next_refresh_in().is_zero()
            {
                let _ = jwks.refresh().await;
            }
        }
    }

    /// How many keys of each source verify tokens now.
    pub fn counts(&self) -> (usize, usize) {
        let current = self.current();
        (current.secrets.len(), current.public.len())
    }

    /// Verifies `token`'s signature with the keys of its algorithm, then its
    /// claims with `validation(algorithm)`.
    pub async fn verify<C: DeserializeOwned>(
        &self,
        token: &str,
        validation: impl Fn(Algorithm) -> Validation,
    ) -> Result<C, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| plain(e.kind()))?;
        let set = self.current();
        let accepted = set.accepted();
        if !accepted.contains(&header.alg) {
            return Err(AuthError::Algorithm {
                got: format!("{:?}", header.alg),
                accepted: accepted.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", "),
            });
        }
        let kid = header.kid.as_deref();
        let mut jwks_keys = set.jwks.as_ref().map(|j| j.keys()).unwrap_or_default();
        let known_kid =
            |keys: &[VerifyingKey]| kid.is_some_and(|kid| keys.iter().any(|k| k.kid.as_deref() == Some(kid)));
        // A key id the cached set lacks: the provider may have rotated.
        if let Some(jwks) = &set.jwks
            && header.alg != Algorithm::HS256
            && (jwks_keys.is_empty() || (kid.is_some() && !known_kid(&jwks_keys)))
            && jwks.refresh_for_unknown_kid().await
        {
            jwks_keys = jwks.keys();
        }
        let candidates = set.candidates(header.alg, kid, &jwks_keys);
        if candidates.is_empty() {
            return Err(AuthError::UnknownKey(match (&set.jwks, kid) {
                (Some(jwks), Some(kid)) => format!(
                    "no key with id {kid:?} verifies {:?} tokens here: not among the {} keys from \
                     GATEWAY_JWKS_URL{}",
                    header.alg,
                    jwks_keys.len(),
                    jwks.failure()
                        .map(|e| format!(" (last fetch failed: {e})"))
                        .unwrap_or_default()
                ),
                (Some(jwks), None) => format!(
                    "no key verifies {:?} tokens here: the keys from GATEWAY_JWKS_URL are not available{}",
                    header.alg,
                    jwks.failure()
                        .map(|e| format!(" (last fetch failed: {e})"))
                        .unwrap_or_default()
                ),
                (None, _) => format!("no configured key verifies {:?} tokens", header.alg),
            }));
        }
        let validation = validation(header.alg);
        for key in &candidates {
            match jsonwebtoken::decode::<C>(token, key, &validation) {
                Ok(data) => return Ok(data.claims),
                Err(e) => match e.kind() {
                    // Another key may verify it.
                    ErrorKind::InvalidSignature
                    | ErrorKind::InvalidEcdsaKey
                    | ErrorKind::InvalidRsaKey(_)
                    | ErrorKind::InvalidEddsaKey
                    | ErrorKind::InvalidKeyFormat => {}
                    // The signature checked out; the claims did not.
                    kind => return Err(plain(kind)),
                },
            }
        }
        Err(AuthError::BadSignature)
    }
}

/// A token error in words a client's developer understands.
fn plain(kind: &ErrorKind) -> AuthError {
    let malformed = |what: &str| AuthError::Malformed(what.to_owned());
    match kind {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidToken => {
            malformed("expected three base64url parts separated by dots (header.claims.signature)")
        }
        ErrorKind::Base64(_) => malformed("a part is not valid base64url"),
        ErrorKind::Json(_) => malformed("the header or the claims are not the JSON a JWT carries"),
        ErrorKind::Utf8(_) => malformed("the header or the claims are not UTF-8"),
        ErrorKind::InvalidAlgorithmName | ErrorKind::UnsupportedAlgorithm | ErrorKind::MissingAlgorithm => {
            malformed("the header names no algorithm this gateway knows")
        }
        ErrorKind::MissingRequiredClaim(claim) => AuthError::Malformed(format!("the token has no `{claim}` claim")),
        ErrorKind::InvalidClaimFormat(claim) => AuthError::Malformed(format!("the `{claim}` claim has the wrong type")),
        ErrorKind::ImmatureSignature => malformed("the token is not valid yet (`nbf` is in the future)"),
        ErrorKind::InvalidIssuer => malformed("the token's issuer (`iss`) is not accepted"),
        ErrorKind::InvalidAudience => malformed("the token's audience (`aud`) is not accepted"),
        ErrorKind::InvalidSubject => malformed("the token's subject (`sub`) is not accepted"),
        ErrorKind::InvalidAlgorithm => malformed("the token's algorithm does not match its key"),
        _ => AuthError::BadSignature,
    }
}
