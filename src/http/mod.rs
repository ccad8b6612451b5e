//! HTTP: register/login/logout, healthz, metrics, the WebSocket upgrade, the web client page.
//! Every error is a JSON body `{"error": CODE, "message": TEXT}` with its status.

pub mod auth;
pub mod cluster;
pub mod guard;
pub mod metrics;
/// The web client (`web/`); named apart from actix's `web` module, which this file uses.
#[path = "web.rs"]
pub mod web_client;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix::prelude::*;
use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};

use crate::actors::session::Session;
use crate::actors::socket::{outbound, ConnGuard, InStream};
use crate::protocol::ErrorCode;
use crate::shared::Shared;
use crate::storage::PipelineError;

/// A request body (`web::Bytes`, under the app's size limit) that must arrive within
/// `server.body_timeout_ms`: a client that sends the head and then trickles or withholds the
/// body gets `408` and the connection back, instead of holding it (and a descriptor) forever.
pub struct Body(pub web::Bytes);

impl actix_web::FromRequest for Body {
    type Error = actix_web::Error;
    type Future = futures_util::future::LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, payload: &mut actix_web::dev::Payload) -> Self::Future {
        let ms = req.app_data::<web::Data<Arc<Shared>>>().map_or(10_000, |s| s.cfg.server.body_timeout_ms);
        let bytes = web::Bytes::from_request(req, payload);
        Box::pin(async move {
            match tokio::time::timeout(std::time::Duration::from_millis(ms), bytes).await {
                Ok(b) => b.map(Body),
                Err(_) => Err(actix_web::error::ErrorRequestTimeout(format!("the request body did not arrive within {ms} ms"))),
            }
        })
    }
}

/// Parses a request body that must be one JSON object (`{"user": ..}`, not `["alice", ..]`,
/// which serde would otherwise read as the struct's fields in order).
///
/// Errors: the reason, for a `400 bad_request`: invalid JSON, a body that is not an object, a
/// key given twice (`{"user":"a","user":"b"}`: which one a proxy reads is anyone's guess), or a
/// missing or wrongly typed field.
pub(crate) fn json_object<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => serde_json::from_slice(body).map_err(|e| e.to_string()),
        _ => match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
            Ok(_) => Err("the body must be a JSON object".to_owned()),
            Err(e) => Err(format!("invalid JSON: {e}")),
        },
    }
}

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
    error_with_status(status_of(code), code, message)
}

/// An error response with a status of its own (405, 426, ...) and `{"error", "message"}`: the
/// one place error bodies are made.
pub fn error_with_status(status: StatusCode, code: ErrorCode, message: &str) -> HttpResponse {
    HttpResponse::build(status).json(serde_json::json!({ "error": code.as_str(), "message": message }))
}

/// Middleware for the whole app: an error response without a JSON body (made by actix before
/// or around our handlers: 413 body too large, 400/426 refused WebSocket handshakes, 405 wrong
/// method, extractor errors) gets the same `{"error", "message"}` body as the handlers' errors,
/// with its status and the headers that status needs (`Allow`, `Upgrade`,
/// `Sec-WebSocket-Version`, `Retry-After`).
pub fn json_errors<B: 'static>() -> actix_web::middleware::ErrorHandlers<B> {
    actix_web::middleware::ErrorHandlers::new().default_handler(json_error_body)
}

fn json_error_body<B>(res: actix_web::dev::ServiceResponse<B>) -> actix_web::Result<actix_web::middleware::ErrorHandlerResponse<B>> {
    use actix_web::middleware::ErrorHandlerResponse;
    let is_json = res.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
    }
    let status = res.status();
    let message = res
        .response()
        .error()
        .map(|e| e.to_string())
        .filter(|m| !m.is_empty())
        .or_else(|| res.response().head().reason.map(str::to_owned))
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned());
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::TooLarge,
        StatusCode::NOT_FOUND => ErrorCode::NotFound,
        StatusCode::UNAUTHORIZED => ErrorCode::Unauthorized,
        StatusCode::TOO_MANY_REQUESTS => ErrorCode::RateLimited,
        StatusCode::SERVICE_UNAVAILABLE => ErrorCode::Unavailable,
        s if s.is_server_error() => ErrorCode::Internal,
        _ => ErrorCode::BadRequest,
    };
    let (req, old) = res.into_parts();
    let mut new = error_with_status(status, code, &message);
    for name in [header::ALLOW, header::UPGRADE, header::SEC_WEBSOCKET_VERSION, header::RETRY_AFTER] {
        if let Some(v) = old.headers().get(&name) {
            new.headers_mut().insert(name, v.clone());
        }
    }
    Ok(ErrorHandlerResponse::Response(actix_web::dev::ServiceResponse::new(req, new).map_into_right_body()))
}

/// The token of an `Authorization: Bearer TOKEN` header. The scheme is matched regardless of
/// case (RFC 9110 §11.1: `bearer TOKEN` works too); `None` without a header, another scheme, or
/// an empty token.
pub(crate) fn bearer(req: &HttpRequest) -> Option<&str> {
    let h = req.headers().get(actix_web::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = h.trim_start().split_once(' ')?;
    Some(token.trim()).filter(|t| scheme.eq_ignore_ascii_case("bearer") && !t.is_empty())
}

/// A route for `GET` and `HEAD` (same handler; actix-http sends a `HEAD` answer's headers
/// without its body).
pub(crate) fn get_or_head() -> actix_web::Route {
    use actix_web::guard;
    web::route().guard(guard::Any(guard::Get()).or(guard::Head()))
}

/// The `503` for a command that was not committed (`overloaded`: the pipeline's queue or every
/// hash slot was full; `unavailable`: storage cannot commit), with `Retry-After: 1`.
pub(crate) fn pipeline_error(e: PipelineError) -> HttpResponse {
    let mut r = match e {
        PipelineError::Overloaded => error(ErrorCode::Overloaded, "the server is overloaded; retry later"),
        PipelineError::Unavailable => error(ErrorCode::Unavailable, "storage cannot commit now; retry later"),
    };
    // Both are passing states: say when to try again (RFC 9110 §10.2.3), as a login does.
    r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    r
}

/// `HttpServer::on_connect` hook: keeps each TCP connection's descriptor in the connection data
/// (a [`ConnGuard`], dropped with the connection), so that a connection that outlives its
/// session can be aborted (`actors::socket::ConnFd::abort_if_open`).
pub fn on_connect(conn: &dyn std::any::Any, ext: &mut actix_web::dev::Extensions) {
    use std::os::fd::AsRawFd;
    if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
        ext.insert(ConnGuard::new(tcp.as_raw_fd()));
    }
}

/// A path with its route, which takes the methods `allow` lists (as in an `Allow` header,
/// `"GET, HEAD"`): another method gets `405` (not the app's `404`) with that `Allow` header,
/// which a 405 must carry (RFC 9110 §15.5.6).
pub(crate) fn resource(path: &str, allow: &'static str, route: actix_web::Route) -> actix_web::Resource {
    web::resource(path).route(route).default_service(web::to(move |req: HttpRequest| async move { method_not_allowed(&req, allow) }))
}

/// `405` for `req`, whose path takes only the methods `allow` lists, with that `Allow` header.
fn method_not_allowed(req: &HttpRequest, allow: &'static str) -> HttpResponse {
    let mut r = error_with_status(StatusCode::METHOD_NOT_ALLOWED, ErrorCode::BadRequest, &format!("{} takes {allow}, not {}", req.path(), req.method()));
    r.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static(allow));
    r
}

/// Mounts every route.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/v1/register", "POST", web::post().to(auth::register)))
        .service(resource("/v1/login", "POST", web::post().to(auth::login)))
        .service(resource("/v1/logout", "POST", web::post().to(auth::logout)))
        .service(resource("/v1/healthz", "GET, HEAD", get_or_head().to(healthz)))
        .service(resource("/v1/ws", "GET", web::get().to(ws)))
        .service(resource("/xmpp-websocket", "GET", web::get().to(crate::xmpp::ws::route)))
        .service(resource("/metrics", "GET, HEAD", get_or_head().to(metrics::render)))
        // While admin.token is empty the path does not exist for any method (404); with a token
        // another method is a 405, as on every other path.
        .service(web::resource("/v1/admin/backup").route(web::post().to(admin_backup)).default_service(web::to(admin_backup_method)))
        .service(resource("/v1/cluster/status", "GET, HEAD", get_or_head().to(cluster::status)))
        .service(resource("/v1/cluster/members", "POST", web::post().to(cluster::add)))
        .service(resource("/v1/cluster/members/{id}", "DELETE", web::delete().to(cluster::remove)))
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

/// Why an upgrade was refused, as `(label, message)`: the `why` label of
/// `parley_admission_rejections_total` (a short word, as Prometheus label values are) and the
/// message of the 503: draining, `admission.max_sockets` open sockets, over
/// `admission.upgrades_per_s`. The XMPP listener counts its refused TCP streams as `xmpp`.
pub const ADMISSION_WHY: [(&str, &str); 3] = [("draining", "the server is shutting down"), ("sockets", "too many open connections"), ("rate", "too many new connections")];

/// 503 with a `Retry-After`, so refused clients do not all come back in the same second: an
/// upgrade refused for the rate (`rate`) gets the next free slot of the upgrade rate
/// ([`crate::limits::Appointments`]); any other refusal, or a queue longer than
/// `retry_after_max_s`, a jittered 1 to `retry_after_max_s` seconds.
fn overloaded(s: &Shared, (label, why): (&'static str, &str), rate: bool) -> HttpResponse {
    use rand::Rng;
    let max = s.cfg.admission.retry_after_max_s;
    let booked = if rate { s.upgrade_slots.book(max) } else { None };
    let secs = booked.unwrap_or_else(|| rand::thread_rng().gen_range(1..=max));
    ::metrics::counter!("parley_admission_rejections_total", "why" => label).increment(1);
    HttpResponse::ServiceUnavailable()
        .insert_header(("Retry-After", secs.to_string()))
        .json(serde_json::json!({ "error": "overloaded", "message": why, "retry_after_ms": secs.saturating_mul(1000) }))
}

/// `GET /v1/healthz`: 200 when ready, 503 while starting, draining, or when storage fails.
async fn healthz(s: web::Data<Arc<Shared>>) -> HttpResponse {
    let status = if !s.ready.load(Ordering::Relaxed) {
        "starting"
    } else if s.draining.load(Ordering::Relaxed) {
        "draining"
    } else if s.cluster.as_ref().is_some_and(|n| !n.is_member()) {
        // Removed from the cluster (parley cluster remove): it serves nothing any more.
        "removed"
    } else if !s.pipeline.healthy() && s.cluster.is_some() {
        // No leader known, or a leader no quorum acknowledged lately: writes cannot commit here.
        "no_quorum"
    } else if !s.pipeline.healthy() {
        "storage_unavailable"
    } else {
        "ok"
    };
    let (role, leader) = match &s.cluster {
        Some(n) => n.role(),
        None => ("single", None),
    };
    // On a cluster node, the Raft index (what `parley cluster status` shows); the state counts
    // one more (its own entry numbering starts at 1, Raft's at 0).
    let applied = match &s.cluster {
        Some(n) => n.applied_index().unwrap_or(0),
        None => s.state().applied(),
    };
    let body = serde_json::json!({
        "status": status,
        "applied_index": applied,
        "sockets": s.sockets.load(Ordering::Relaxed),
        "role": role,
        "leader": leader,
    });
    if status == "ok" {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// The answer to an admin request without the right `Authorization: Bearer <admin.token>`: 404
/// while `admin.token` is empty (no admin API at all), 401 on a missing or wrong token; `None`
/// when the token is right.
pub(crate) fn admin_denied(s: &Shared, req: &HttpRequest) -> Option<HttpResponse> {
    if s.cfg.admin.token.is_empty() {
        return Some(error(ErrorCode::NotFound, "no such path"));
    }
    // Compare digests, so the time taken does not depend on how much of the token matched.
    let ok = bearer(req).is_some_and(|t| auth::token_hash(t) == auth::token_hash(&s.cfg.admin.token));
    (!ok).then(|| error(ErrorCode::Unauthorized, "admin token required"))
}

/// `POST /v1/admin/backup` `{"dir": PATH}` with `Authorization: Bearer <admin.token>`: a
/// consistent backup taken on the commit thread between batches; `200 {"dir", "applied_index"}`.
/// 404 when `admin.token` is empty; 401 on a wrong token.
async fn admin_backup(s: web::Data<Arc<Shared>>, req: HttpRequest, Body(body): Body) -> HttpResponse {
    if let Some(denied) = admin_denied(&s, &req) {
        return denied;
    }
    #[derive(serde::Deserialize)]
    struct Body {
        dir: std::path::PathBuf,
    }
    let b: Body = match json_object(&body) {
        Ok(b) => b,
        Err(e) => return error(ErrorCode::BadRequest, &format!("body must be {{\"dir\": PATH}}: {e}")),
    };
    if b.dir.is_relative() {
        return error(ErrorCode::BadRequest, &format!("backup failed: {}", crate::data_dir::DataDirError::BackupRelative(b.dir)));
    }
    if let Err(e) = crate::data_dir::check_backup_target(&b.dir, &s.cfg.server.data_dir) {
        return error(ErrorCode::BadRequest, &format!("backup failed: {e}"));
    }
    match s.pipeline.backup(b.dir.clone()).await {
        Ok(applied) => HttpResponse::Ok().json(serde_json::json!({ "dir": b.dir, "applied_index": applied })),
        Err(e) => error(ErrorCode::BadRequest, &format!("backup failed: {e}")),
    }
}

/// Any method but `POST` on `/v1/admin/backup`: 404 while `admin.token` is empty (see
/// [`admin_denied`]), else 405 with `Allow: POST`.
async fn admin_backup_method(s: web::Data<Arc<Shared>>, req: HttpRequest) -> HttpResponse {
    if s.cfg.admin.token.is_empty() {
        return error(ErrorCode::NotFound, "no such path");
    }
    method_not_allowed(&req, "POST")
}

/// Admission control of a WebSocket upgrade (native or XMPP): `None` to go on, or the `503`
/// with a `Retry-After` (see [`overloaded`]) while draining, at `admission.max_sockets` open
/// sockets, or over `admission.upgrades_per_s` (which this takes a token of).
pub(crate) fn admit(s: &Shared) -> Option<HttpResponse> {
    if s.draining.load(Ordering::Relaxed) {
        return Some(overloaded(s, ADMISSION_WHY[0], false));
    }
    if s.sockets.load(Ordering::Relaxed) >= s.cfg.admission.max_sockets {
        return Some(overloaded(s, ADMISSION_WHY[1], false));
    }
    if !s.upgrade_limiter.allow("") {
        return Some(overloaded(s, ADMISSION_WHY[2], true));
    }
    None
}

/// `GET /v1/ws`: the WebSocket upgrade (RFC 6455 §4.2 handshake); starts a [`Session`] over the
/// socket's message stream, and answers `101` with the body that drains its outbound queue
/// (`actors/socket.rs`).
async fn ws(s: web::Data<Arc<Shared>>, req: HttpRequest, body: web::Payload) -> Result<HttpResponse, actix_web::Error> {
    if let Some(refused) = admit(&s) {
        return Ok(refused);
    }
    // Frame headers are checked as the bytes arrive (see `guard`): actix-http would otherwise
    // buffer a frame up to its declared length before looking at its size.
    let limit = Arc::new(crate::limits::FrameLimit {
        cap: std::sync::atomic::AtomicUsize::new(s.cfg.session.unauth_max_frame_bytes),
        tripped: std::sync::atomic::AtomicBool::new(false),
    });
    let mut handshake = actix_http::ws::handshake(req.head())?;
    let stream = InStream::new(guard::FrameGuard::new(body.into_inner(), limit.clone()), s.cfg.session.max_frame_bytes);
    let conn = req.conn_data::<ConnGuard>().map(ConnGuard::handle);
    let close_wait = std::time::Duration::from_millis(s.cfg.session.slow_close_wait_ms);
    let (out, body) = outbound(s.cfg.session.outbound_queue_frames, conn, close_wait);
    let resp: HttpResponse = handshake.message_body(actix_web::body::MessageBody::boxed(actix_web::body::BodyStream::new(body)))?.into();
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
