//! Hostile input, generated: the client message decoder, the JWT path and the
//! capture-document parser never panic, and refuse what they refuse with a
//! message. Bounded (a few thousand cases each) so it runs in `make test`.

use proptest::prelude::*;
use ws_gateway::Authenticator;
use ws_gateway::change::Notification;
use ws_gateway::config::Auth;
use ws_gateway::{ClientMessage, MAX_ROOM_BYTES, decode};

const SECRET: &str = "fuzzing-secret-that-is-at-least-32-bytes";

/// Runs the token check (async: it may refetch a key set) to completion.
fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(future)
}

/// JSON-shaped text around the protocol's own vocabulary, so the decoder's
/// deeper branches are reached, not just "not JSON".
fn protocol_like() -> impl Strategy<Value = String> {
    let value = prop_oneof![
        Just("null".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        "[a-z:*0-9 \\\\\"\\x00-\\x1f\\u{80}-\\u{10ffff}]{0,40}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        Just("[1,2]".to_owned()),
        Just("{}".to_owned()),
    ];
    let key = prop_oneof![
        Just("type"),
        Just("room"),
        Just("since"),
        Just("position"),
        Just("token"),
        Just("x")
    ];
    let kind = prop_oneof![
        Just("\"subscribe\""),
        Just("\"unsubscribe\""),
        Just("\"ack\""),
        Just("\"auth\""),
        Just("\"SUBSCRIBE\""),
        Just("7")
    ];
    (kind, prop::collection::vec((key, value), 0..5)).prop_map(|(kind, fields)| {
        let mut text = format!("{{\"type\":{kind}");
        for (k, v) in fields {
            text.push_str(&format!(",\"{k}\":{v}"));
        }
        text.push('}');
        text
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_decoder_never_panics_on_bytes(text in "\\PC{0,200}") {
        if let Err(e) = decode(&text) {
            prop_assert!(!e.message.is_empty());
        }
    }

    #[test]
    fn the_decoder_accepts_only_valid_messages(text in protocol_like()) {
        match decode(&text) {
            Ok(ClientMessage::Subscribe { room, .. }) | Ok(ClientMessage::Unsubscribe { room }) => {
                prop_assert!(!room.is_empty() && room.len() <= MAX_ROOM_BYTES);
                prop_assert!(!room.chars().any(|c| c.is_control() || c.is_whitespace()));
            }
            Ok(ClientMessage::Auth { token }) => prop_assert!(!token.is_empty()),
            Ok(ClientMessage::Ack { .. }) => {}
            Ok(ClientMessage::Ping { id }) => prop_assert!(id.is_none_or(|id| id.len() <= 64)),
            Err(e) => prop_assert!(!e.message.is_empty() && !e.code.is_empty()),
        }
    }

    #[test]
    fn tokens_that_are_not_ours_are_refused_without_panicking(token in "[A-Za-z0-9_.=-]{0,300}") {
        let auth = Authenticator::new(&Auth::hs256(SECRET), 0);
        prop_assert!(block_on(auth.authenticate(Some(&token))).is_err());
    }

    #[test]
    fn a_tampered_token_is_refused(flip in 0usize..400, byte in any::<u8>()) {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let claims = serde_json::json!({"sub": "u", "exp": 4_102_444_800u64, "rooms": ["project:*"]});
        let token = encode(&Header::default(), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap();
        let auth = Authenticator::new(&Auth::hs256(SECRET), 0);
        prop_assert!(block_on(auth.authenticate(Some(&token))).is_ok());
        let mut bytes = token.into_bytes();
        let i = flip % bytes.len();
        if bytes[i] != byte {
            bytes[i] = byte;
            let tampered = String::from_utf8_lossy(&bytes).into_owned();
            // A change that decodes to the same bytes (base64 padding bits)
            // may still verify; any other must not.
            if let Ok(identity) = block_on(auth.authenticate(Some(&tampered))) {
                prop_assert_eq!(identity.subject.as_deref(), Some("u"));
            }
        }
    }

    #[test]
    fn capture_documents_never_panic(text in "\\PC{0,200}") {
        let _ = Notification::parse(&text);
    }
}
