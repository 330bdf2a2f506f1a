//! `GET /client.js`: the JavaScript client (clients/js/client.js, the npm
//! package's one module), compiled in, so a page on any origin can import
//! the client that matches this gateway's protocol.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The npm package's module, byte for byte.
pub const CLIENT_JS: &str = include_str!("../../../../clients/js/client.js");

/// Five minutes: a page picks up a new gateway's client soon after an
/// upgrade, and a revalidation after that costs a 304.
const CACHE_CONTROL: &str = "public, max-age=300";

/// The module's entity tag: a hash of its bytes (FNV-1a), the same on every
/// instance that serves the same file.
fn etag() -> String {
    let hash = CLIENT_JS.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("\"{hash:016x}\"")
}

pub async fn serve(request: HeaderMap) -> Response {
    let etag = etag();
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let headers = [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/javascript; charset=utf-8"),
        ),
        // A module imported from another origin is fetched in CORS mode.
        (header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*")),
        (header::CACHE_CONTROL, HeaderValue::from_static(CACHE_CONTROL)),
        (
            header::ETAG,
            HeaderValue::from_str(&etag).expect("hex is a valid header value"),
        ),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
    ];
    if fresh {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    (StatusCode::OK, headers, CLIENT_JS).into_response()
}
