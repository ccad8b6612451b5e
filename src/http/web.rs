//! The web client: the static files of `web/`, embedded in the binary at compile time and served
//! at `/`, `/app.js`, ... No build step, no CDN: the page loads nothing but these files and talks
//! to `/v1/ws` like any other client.
//!
//! Every response carries a Content-Security-Policy that allows scripts, styles and connections to
//! this origin only, and no inline script at all: a message body that slipped into the page as
//! markup still could not run. Files are revalidated on each load (`no-cache` with an `ETag`), so
//! a new binary's client is picked up at the next reload.

use std::sync::OnceLock;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use sha2::{Digest, Sha256};

/// What the page may load: its own origin only (WebSockets included: `'self'` matches `ws:` on
/// the same host and port), no inline script or style, no plugins, no framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
    connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One embedded file: the path it is served at, its content type, its bytes.
struct File {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

/// The client's files. A file added to `web/` must be listed here to be served.
static FILES: &[File] = &[
    File { path: "/", content_type: "text/html; charset=utf-8", body: include_bytes!("../../web/index.html") },
    File { path: "/style.css", content_type: "text/css; charset=utf-8", body: include_bytes!("../../web/style.css") },
    File { path: "/app.js", content_type: "text/javascript; charset=utf-8", body: include_bytes!("../../web/app.js") },
    File { path: "/conn.js", content_type: "text/javascript; charset=utf-8", body: include_bytes!("../../web/conn.js") },
    File { path: "/store.js", content_type: "text/javascript; charset=utf-8", body: include_bytes!("../../web/store.js") },
    File { path: "/dom.js", content_type: "text/javascript; charset=utf-8", body: include_bytes!("../../web/dom.js") },
    File { path: "/favicon.svg", content_type: "image/svg+xml", body: include_bytes!("../../web/favicon.svg") },
];

/// The `ETag` of each file (a hash of its bytes), computed on first use.
fn etags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| FILES.iter().map(|f| format!("\"{}\"", &hex::encode(Sha256::digest(f.body))[..20])).collect())
}

/// Mounts a `GET` (and `HEAD`) route for every embedded file.
pub fn routes(cfg: &mut web::ServiceConfig) {
    for (i, f) in FILES.iter().enumerate() {
        cfg.service(super::resource(f.path, "GET, HEAD", super::get_or_head().to(move |req: HttpRequest| async move { serve(i, &req) })));
    }
}

/// One file, or `304 Not Modified` when the browser's copy is current.
fn serve(i: usize, req: &HttpRequest) -> HttpResponse {
    let f = &FILES[i];
    let tag = &etags()[i];
    let fresh = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    let mut resp = if fresh { HttpResponse::NotModified() } else { HttpResponse::Ok() };
    resp.insert_header((header::ETAG, tag.as_str()))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::CONTENT_SECURITY_POLICY, CSP))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"));
    if fresh {
        resp.finish()
    } else {
        resp.content_type(f.content_type).body(f.body)
    }
}
