//! JWT key sources through the real gateway: several HS256 secrets, PEM
//! public keys (RS256, ES256, EdDSA), and an identity provider's JWKS that
//! the test serves itself on loopback, rotating its key and going down.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, encode};
use serde_json::{Value, json};
use ws_gateway::config::{Auth, JwtKeys, PublicKeyFile};

use crate::helpers::{
    Client, TestApp, TestDb, eventually, fresh_database, http_get, http_get_json, sample, spawn_app_with,
};
use crate::security::refused_upgrade;

fn key_file(name: &str) -> String {
    let path = format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn token(algorithm: Algorithm, kid: Option<&str>, key: &EncodingKey, sub: &str) -> String {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 600;
    let mut header = Header::new(algorithm);
    header.kid = kid.map(str::to_owned);
    encode(&header, &json!({"sub": sub, "exp": exp, "rooms": ["project:*"]}), key).unwrap()
}

fn rsa(name: &str) -> EncodingKey {
    EncodingKey::from_rsa_pem(key_file(&format!("{name}.key.pem")).as_bytes()).unwrap()
}

/// Connects with `token` and subscribes: the token verified.
async fn accepted(app: &TestApp, token: &str) {
    let mut client = Client::connect(&format!("{}?token={token}", app.ws_url())).await;
    client.subscribe("project:1").await;
}

/// The status and body of an upgrade refused for `token`.
async fn refused(app: &TestApp, token: &str) -> (u16, String) {
    refused_upgrade(&format!("{}?token={token}", app.ws_url()), &[]).await
}

async fn jwt_app(db: TestDb, keys: JwtKeys) -> TestApp {
    spawn_app_with(db, |s| s.auth = Auth::Jwt(keys)).await
}

/// Before: HS256 with one secret only, and library names in the errors
/// (`malformed token: InvalidToken`, `InvalidAlgorithm` for HS512).
#[tokio::test]
async fn several_secrets_and_pem_public_keys_verify_tokens() {
    let old = "the-old-secret-of-at-least-thirty-two-bytes";
    let new = "the-new-secret-of-at-least-thirty-two-bytes";
    let public = |name: &str, algorithm| PublicKeyFile {
        path: name.into(),
        algorithm,
        pem: key_file(&format!("{name}.pub.pem")),
    };
    let app = jwt_app(
        fresh_database().await,
        JwtKeys {
            secrets: vec![new.into(), old.into()],
            public_keys: vec![
                public("rsa-a", Algorithm::RS256),
                public("ec-p256", Algorithm::ES256),
                public("ed25519", Algorithm::EdDSA),
            ],
            jwks_url: None,
        },
    )
    .await;
    for secret in [old, new] {
        accepted(
            &app,
            &token(
                Algorithm::HS256,
                None,
                &EncodingKey::from_secret(secret.as_bytes()),
                "u",
            ),
        )
        .await;
    }
    accepted(&app, &token(Algorithm::RS256, Some("any"), &rsa("rsa-a"), "u")).await;
    let ec = EncodingKey::from_ec_pem(key_file("ec-p256.key.pem").as_bytes()).unwrap();
    accepted(&app, &token(Algorithm::ES256, None, &ec, "u")).await;
    let ed = EncodingKey::from_ed_pem(key_file("ed25519.key.pem").as_bytes()).unwrap();
    accepted(&app, &token(Algorithm::EdDSA, None, &ed, "u")).await;

    // A key nobody configured, an algorithm nobody accepts, garbage: said plainly.
    let (status, body) = refused(&app, &token(Algorithm::RS256, None, &rsa("rsa-b"), "u")).await;
    assert_eq!((status, body.as_str()), (401, "token signature does not verify"));
    let hs512 = token(Algorithm::HS512, None, &EncodingKey::from_secret(new.as_bytes()), "u");
    let (status, body) = refused(&app, &hs512).await;
    assert_eq!(status, 401);
    assert_eq!(
        body,
        "token is signed with HS512; this gateway accepts HS256, RS256, ES256, EdDSA"
    );
    let (_, body) = refused(&app, "garbage").await;
    assert_eq!(
        body,
        "malformed token: expected three base64url parts separated by dots (header.claims.signature)"
    );
    let (_, health) = app.health().await;
    assert_eq!(health["auth"]["hs256_secrets"], 2, "{health}");
    assert_eq!(health["auth"]["public_keys"], 3, "{health}");
    app.stop().await.expect("a clean stop");
}

/// An identity provider, served by the test: its key set (or a failure),
/// and how many times it was fetched.
pub(crate) struct Provider {
    address: SocketAddr,
    /// The JWKS document; None answers 500.
    body: Arc<Mutex<Option<String>>>,
    fetches: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Provider {
    pub(crate) async fn start() -> Provider {
        let body: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let fetches = Arc::new(AtomicU64::new(0));
        let router = axum::Router::new().route(
            "/.well-known/jwks.json",
            axum::routing::get({
                let body = Arc::clone(&body);
                let fetches = Arc::clone(&fetches);
                move || async move {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    match body.lock().unwrap().clone() {
                        Some(document) => (axum::http::StatusCode::OK, document),
                        None => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "down".to_owned()),
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Provider {
            address,
            body,
            fetches,
            task,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.address)
    }

    /// Publishes the public halves of `keys` (`(file stem, kid)`); an empty
    /// list takes the provider down.
    pub(crate) fn publish(&self, keys: &[(&str, &str)]) {
        let document = (!keys.is_empty()).then(|| {
            let keys = keys
                .iter()
                .map(|(name, kid)| {
                    let key = DecodingKey::from_rsa_pem(key_file(&format!("{name}.pub.pem")).as_bytes()).unwrap();
                    let mut jwk = Jwk::from_decoding_key(&key, Some(Algorithm::RS256)).unwrap();
                    jwk.common.key_id = Some((*kid).to_owned());
                    jwk
                })
                .collect();
            serde_json::to_string(&JwkSet { keys }).unwrap()
        });
        *self.body.lock().unwrap() = document;
    }

    fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn jwks_status(app: &TestApp) -> Value {
    let (_, health) = app.health().await;
    health["auth"]["jwks"].clone()
}

async fn metric(app: &TestApp, series: &str) -> Option<f64> {
    sample(&http_get(app.admin, "/metrics").await.1, series)
}

/// Before: no key sources but one HS256 secret. The provider rotates its key
/// (picked up at once, by the unknown kid), a flood of made-up kids costs it
/// no more fetches, and a failing provider leaves the last good keys in use,
/// visibly.
#[tokio::test]
async fn keys_from_a_jwks_with_rotation_and_failures() {
    let provider = Provider::start().await;
    let db = fresh_database().await;
    let keys = JwtKeys {
        jwks_url: Some(provider.url()),
        ..JwtKeys::default()
    };
    let a = token(Algorithm::RS256, Some("a"), &rsa("rsa-a"), "alice");
    let b = token(Algorithm::RS256, Some("b"), &rsa("rsa-b"), "bob");

    // Rotation: A, then B alone.
    provider.publish(&[("rsa-a", "a")]);
    let app = jwt_app(db.shared(), keys.clone()).await;
    assert_eq!(provider.fetches(), 1, "fetched at start");
    accepted(&app, &a).await;
    assert_eq!(provider.fetches(), 1, "served from the cache");
    provider.publish(&[("rsa-b", "b")]);
    accepted(&app, &b).await;
    assert_eq!(provider.fetches(), 2, "the unknown kid b refetched once");
    // A is gone from the set: refused; made-up kids fetch nothing more
    // within the minute.
    let (status, body) = refused(&app, &a).await;
    assert_eq!(status, 401);
    assert!(body.contains("no key with id \"a\""), "{body}");
    for i in 0..20 {
        let bogus = token(
            Algorithm::RS256,
            Some(&format!("made-up-{i}")),
            &rsa("rsa-a"),
            "mallory",
        );
        assert_eq!(refused(&app, &bogus).await.0, 401);
    }
    assert_eq!(provider.fetches(), 2, "at most one refetch a minute for unknown kids");
    let status = jwks_status(&app).await;
    assert_eq!(status["state"], "ok", "{status}");
    assert_eq!(status["keys"], 1, "{status}");
    assert_eq!(metric(&app, "ws_gateway_jwks_up").await, Some(1.0));
    assert_eq!(
        metric(&app, "ws_gateway_jwks_fetches_total{result=\"ok\"}").await,
        Some(2.0)
    );
    app.stop().await.expect("a clean stop");

    // A provider that fails after a good fetch: the last good keys verify,
    // and /healthz and /metrics say it is failing.
    provider.publish(&[("rsa-a", "a")]);
    let app = jwt_app(db.shared(), keys.clone()).await;
    provider.publish(&[]);
    let before = provider.fetches();
    let unknown = token(Algorithm::RS256, Some("c"), &rsa("rsa-b"), "carol");
    let (_, body) = refused(&app, &unknown).await;
    assert!(body.contains("last fetch failed: the server answered 500"), "{body}");
    assert_eq!(provider.fetches(), before + 1);
    accepted(&app, &a).await;
    let status = jwks_status(&app).await;
    assert_eq!(status["state"], "failing", "{status}");
    assert_eq!(status["keys"], 1, "the last good keys are kept: {status}");
    assert!(status["last_error"].as_str().unwrap().contains("500"), "{status}");
    assert!(status["last_success_s"].as_f64().unwrap() > 0.0, "{status}");
    assert_eq!(metric(&app, "ws_gateway_jwks_up").await, Some(0.0));
    assert_eq!(
        metric(&app, "ws_gateway_jwks_fetches_total{result=\"error\"}").await,
        Some(1.0)
    );
    assert_eq!(metric(&app, "ws_gateway_jwks_keys").await, Some(1.0));
    app.stop().await.expect("a clean stop");

    // A provider down at start: the gateway starts, says why nobody can
    // connect, and takes the keys as soon as a token asks for them.
    let app = jwt_app(db, keys).await;
    let (_, health) = app.health().await;
    assert_eq!(health["status"], "degraded", "no key at all: {health}");
    assert_eq!(health["auth"]["jwks"]["state"], "failing", "{health}");
    provider.publish(&[("rsa-a", "a")]);
    accepted(&app, &a).await;
    eventually("healthy once the keys arrived", || async {
        let (_, health) = app.health().await;
        (health["status"] == "healthy").then_some(())
    })
    .await;
    let (_, stats) = http_get_json(app.admin, "/api/stats").await;
    assert_eq!(stats["health"]["auth"]["jwks"]["state"], "ok", "{stats}");
    app.stop().await.expect("a clean stop");
}

/// Keys reload on SIGHUP: a new secret verifies without a restart.
#[tokio::test]
async fn a_reload_rotates_secrets_without_a_restart() {
    let old = "the-old-secret-of-at-least-thirty-two-bytes";
    let new = "the-new-secret-of-at-least-thirty-two-bytes";
    let app = jwt_app(
        fresh_database().await,
        JwtKeys {
            secrets: vec![old.into()],
            ..JwtKeys::default()
        },
    )
    .await;
    let signed = |secret: &str| {
        token(
            Algorithm::HS256,
            None,
            &EncodingKey::from_secret(secret.as_bytes()),
            "u",
        )
    };
    let mut kept = Client::connect(&format!("{}?token={}", app.ws_url(), signed(old))).await;
    kept.subscribe("project:1").await;
    assert_eq!(refused(&app, &signed(new)).await.0, 401);
    let state = std::sync::Arc::clone(&app.state);
    let mut fresh = (*state.settings()).clone();
    fresh.auth = Auth::Jwt(JwtKeys {
        secrets: vec![new.into(), old.into()],
        ..JwtKeys::default()
    });
    state.apply(fresh);
    accepted(&app, &signed(new)).await;
    accepted(&app, &signed(old)).await;
    // The connection made before the reload is still there.
    kept.send_json(json!({"type": "ping"})).await;
    assert_eq!(kept.next_json().await["type"], "pong");
    app.stop().await.expect("a clean stop");
}
