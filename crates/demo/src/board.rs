//! The project board `make run` serves beside the dashboard: a page of the
//! ConstructTrack application, built as a real one would be. Its backend
//! (this) serves the page, the board's state as of a position, and
//! short-lived tokens; the page imports the client from the gateway
//! (`/client.js`, another origin) and follows `project:{id}` from that
//! position, so the board stays exact: nothing missed between the load and
//! the live stream, nothing applied twice. Tasks move between columns and
//! daily logs appear as the demo writer commits them.
//!
//! It lives in the demo, not in the gateway: it knows the demo's tables,
//! and an application's pages, state and tokens are the application's.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long a token the board hands out lives (the client asks for the
/// next one before it expires).
const TOKEN_LIFETIME: Duration = Duration::from_secs(600);

#[derive(Clone)]
pub struct BoardOptions {
    /// The gateway's port: the page reaches it on the host it was loaded
    /// from.
    pub gateway_port: u16,
    /// The gateway's HS256 secret when it checks tokens
    /// (`GATEWAY_AUTH=jwt`); `None`: it does not, and `/token` is empty.
    pub jwt_secret: Option<String>,
}

#[derive(Clone)]
struct Board {
    pool: PgPool,
    options: BoardOptions,
}

/// Serves the board until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    pool: PgPool,
    options: BoardOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/", get(page))
        .route("/api/projects", get(projects))
        .route("/api/board/{project}", get(board))
        .route("/token", get(token))
        .with_state(Board { pool, options });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .context("serving the project board")
}

async fn page(State(board): State<Board>) -> Html<String> {
    Html(include_str!("board.html").replace("__GATEWAY_PORT__", &board.options.gateway_port.to_string()))
}

fn json(result: Result<serde_json::Value, sqlx::Error>) -> Response {
    match result {
        Ok(value) => ([(header::CACHE_CONTROL, "no-store")], axum::Json(value)).into_response(),
        Err(error) => {
            tracing::warn!(%error, "board query failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("database unavailable: {error}"),
            )
                .into_response()
        }
    }
}

async fn projects(State(board): State<Board>) -> Response {
    let query = "select coalesce(json_agg(json_build_object('id', id, 'name', name, 'city', city, 'status', status) \
                 order by id), '[]') from public.projects";
    json(sqlx::query_scalar(query).fetch_one(&board.pool).await)
}

/// The project's tasks and latest daily logs, and the position they are
/// as of: one statement, one snapshot. Positions are allocated at commit,
/// so the snapshot holds exactly the changes up to the largest position it
/// sees; the page subscribes `since` it.
async fn board(State(board): State<Board>, Path(project): Path<i64>) -> Response {
    let query = "select json_build_object( \
           'position', greatest(coalesce((select max(position) from realtime.changes), 0), \
                                (select pruned_through from realtime.settings))::text, \
           'project', (select row_to_json(p) from public.projects p where p.id = $1), \
           'tasks', coalesce((select json_agg(t order by t.id) from public.tasks t where t.project_id = $1), '[]'), \
           'logs', coalesce((select json_agg(l order by l.id desc) from \
                     (select * from public.daily_logs where project_id = $1 order by id desc limit 30) l), '[]'), \
           'crew', coalesce((select json_object_agg(id, full_name) from public.crew_members), '{}'))";
    json(sqlx::query_scalar(query).bind(project).fetch_one(&board.pool).await)
}

/// A short-lived token for the project rooms, as the application's backend
/// would mint one for its signed-in user.
async fn token(State(board): State<Board>) -> Response {
    let Some(secret) = &board.options.jwt_secret else {
        return (StatusCode::OK, [(header::CACHE_CONTROL, "no-store")], String::new()).into_response();
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let claims = serde_json::json!({
        "sub": "demo-board",
        "rooms": ["project:*"],
        "iat": now,
        "exp": now + TOKEN_LIFETIME.as_secs(),
    });
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    match jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key) {
        Ok(token) => ([(header::CACHE_CONTROL, "no-store")], token).into_response(),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot sign a token: {error}"),
        )
            .into_response(),
    }
}
