//! HTTP: register/login/logout, healthz, metrics, the WebSocket upgrade, the web client page.
//! Every error is a JSON body `{"error": CODE, "message": TEXT}` with its status.

pub mod auth;
pub mod guard;
pub mod metrics;
/// The web client (`web/`); named apart from actix's `web` module, which this file uses.
#[path = "web.rs"]
pub mod web_client;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix::prelude::*;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};

use crate::actors::session::{outbound, writer, ConnFd, Session};
use crate::protocol::ErrorCode;
use crate::server::Shared;
use crate::storage::PipelineError;

/// The HTTP status of an error code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadRequest | ErrorCode::BadFrame | ErrorCode::TooLarge => StatusCode::BAD_REQUEST,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::RegistrationClosed | ErrorCode::NotMember | ErrorCode::NotAdmin => StatusCode::FORBIDDEN,
        ErrorCode::NotFound | ErrorCode::UnknownUser => StatusCode::NOT_FOUND,
        ErrorCode::UserExists => StatusCode::CONFLICT,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Overloaded | ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An error response: the code's status and `{"error", "message"}`.
pub fn error(code: ErrorCode, message: &str) -> HttpResponse {
    HttpResponse::build(status_of(code)).json(serde_json::json!({ "error": code.as_str(), "message": message }))
}

pub(crate) fn pipeline_error(e: PipelineError) -> HttpResponse {
    match e {
        PipelineError::Overloaded => error(ErrorCode::Overloaded, "the server is overloaded; retry later"),
        PipelineError::Unavailable => error(ErrorCode::Unavailable, "storage cannot commit now; retry later"),
    }
}

/// `HttpServer::on_connect` hook: keeps each TCP connection's descriptor in the connection
/// data, for [`ConnFd::abort`].
pub fn on_connect(conn: &dyn std::any::Any, ext: &mut actix_web::dev::Extensions) {
    use std::os::fd::AsRawFd;
    if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
        ext.insert(ConnFd(tcp.as_raw_fd()));
    }
}

/// Mounts every route.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/register", web::post().to(auth::register))
        .route("/v1/login", web::post().to(auth::login))
        .route("/v1/logout", web::post().to(auth::logout))
        .route("/v1/healthz", web::get().to(healthz))
        .route("/v1/ws", web::get().to(ws))
        .route("/xmpp-websocket", web::get().to(crate::xmpp::ws::route))
        .route("/metrics", web::get().to(metrics::render))
        .route("/v1/admin/backup", web::post().to(admin_backup))
        .configure(web_client::routes)
        .default_service(web::to(|| async { error(ErrorCode::NotFound, "no such path") }));
}

/// Every path while start-up recovery runs: 503 (`/v1/healthz` says `starting`).
pub async fn starting(req: HttpRequest) -> HttpResponse {
    if req.path() == "/v1/healthz" {
        HttpResponse::ServiceUnavailable().json(serde_json::json!({ "status": "starting" }))
    } else {
        error(ErrorCode::Unavailable, "the server is starting; retry shortly")
    }
}

/// 503 with a jittered `Retry-After` (1 to `retry_after_max_s` seconds), so refused clients do
/// not all come back in the same second.
fn overloaded(s: &Shared, why: &str) -> HttpResponse {
    use rand::Rng;
    let secs = rand::thread_rng().gen_range(1..=s.cfg.admission.retry_after_max_s);
    ::metrics::counter!("parley_admission_rejections_total", "why" => why.to_owned()).increment(1);
    HttpResponse::ServiceUnavailable()
        .insert_header(("Retry-After", secs.to_string()))
        .json(serde_json::json!({ "error": "overloaded", "message": why, "retry_after_ms": secs * 1000 }))
}

/// `GET /v1/healthz`: 200 when ready, 503 while starting, draining, or when storage fails.
async fn healthz(s: web::Data<Arc<Shared>>) -> HttpResponse {
    let status = if !s.ready.load(Ordering::Relaxed) {
        "starting"
    } else if s.draining.load(Ordering::Relaxed) {
        "draining"
    } else if !s.pipeline.healthy() {
        "storage_unavailable"
    } else {
        "ok"
    };
    let body = serde_json::json!({
        "status": status,
        "applied_index": s.state.applied(),
        "sockets": s.sockets.load(Ordering::Relaxed),
    });
    if status == "ok" {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// `POST /v1/admin/backup` `{"dir": PATH}` with `Authorization: Bearer <admin.token>`: a
/// consistent backup taken on the commit thread between batches; `200 {"dir", "applied_index"}`.
/// 404 when `admin.token` is empty; 401 on a wrong token.
async fn admin_backup(s: web::Data<Arc<Shared>>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    if s.cfg.admin.token.is_empty() {
        return error(ErrorCode::NotFound, "no such path");
    }
    let given = req.headers().get("authorization").and_then(|h| h.to_str().ok()).and_then(|h| h.strip_prefix("Bearer "));
    // Compare digests, so the time taken does not depend on how much of the token matched.
    let ok = given.is_some_and(|t| auth::token_hash(t.trim()) == auth::token_hash(&s.cfg.admin.token));
    if !ok {
        return error(ErrorCode::Unauthorized, "admin token required");
    }
    #[derive(serde::Deserialize)]
    struct Body {
        dir: std::path::PathBuf,
    }
    let Ok(b) = serde_json::from_slice::<Body>(&body) else {
        return error(ErrorCode::BadRequest, "body must be {\"dir\": PATH}");
    };
    match s.pipeline.backup(b.dir.clone()).await {
        Ok(applied) => HttpResponse::Ok().json(serde_json::json!({ "dir": b.dir, "applied_index": applied })),
        Err(e) => error(ErrorCode::BadRequest, &format!("backup failed: {e}")),
    }
}

/// `GET /v1/ws`: the WebSocket upgrade; starts a [`Session`] and its writer task.
async fn ws(s: web::Data<Arc<Shared>>, req: HttpRequest, body: web::Payload) -> Result<HttpResponse, actix_web::Error> {
    if s.draining.load(Ordering::Relaxed) {
        return Ok(overloaded(&s, "the server is shutting down"));
    }
    if s.sockets.load(Ordering::Relaxed) >= s.cfg.admission.max_sockets {
        return Ok(overloaded(&s, "too many open connections"));
    }
    if !s.upgrade_limiter.allow("") {
        return Ok(overloaded(&s, "too many new connections"));
    }
    // Frame headers are checked as the bytes arrive (see `guard`): actix-http would otherwise
    // buffer a frame up to its declared length before looking at its size.
    let limit = Arc::new(guard::FrameLimit {
        cap: std::sync::atomic::AtomicUsize::new(s.cfg.session.unauth_max_frame_bytes),
        tripped: std::sync::atomic::AtomicBool::new(false),
    });
    let guarded = guard::FrameGuard::new(body.into_inner(), limit.clone());
    let stream: std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<bytes::Bytes, actix_web::error::PayloadError>>>> = Box::pin(guarded);
    let mut raw = actix_web::dev::Payload::Stream { payload: stream };
    let body = <web::Payload as actix_web::FromRequest>::from_request(&req, &mut raw).await?;
    let (resp, ws, stream) = actix_ws::handle(&req, body)?;
    let stream = stream.max_frame_size(s.cfg.session.max_frame_bytes);
    let conn = req.conn_data::<ConnFd>().copied();
    let close_wait = std::time::Duration::from_millis(s.cfg.session.slow_close_wait_ms);
    let (out, wire) = outbound(s.cfg.session.outbound_queue_frames, conn, close_wait);
    actix_rt::spawn(writer(ws, wire));
    let id = s.next_session.fetch_add(1, Ordering::Relaxed);
    let shared: Arc<Shared> = s.get_ref().clone();
    let addr = Session::create(move |ctx| {
        ctx.add_stream(stream);
        Session::new(id, shared, out, limit)
    });
    // Counted and reachable for shutdown before the 101 goes out (the session's `stopped` undoes
    // both). A shutdown that began meanwhile may have missed it: tell it now.
    s.sockets.fetch_add(1, Ordering::Relaxed);
    s.sessions.insert(id, addr.clone().recipient());
    if s.draining.load(Ordering::Relaxed) {
        addr.do_send(crate::actors::messages::Kick { code: crate::protocol::close::GOING_AWAY, reason: "server shutting down", goaway_ms: Some(0) });
    }
    Ok(resp)
}
