//! The cluster's HTTP API (issue 12): `GET /v1/cluster/status` (open, like `/v1/healthz`), and
//! membership changes with `Authorization: Bearer <admin.token>`: `POST /v1/cluster/members`
//! `{"id": N, "addr": "HOST:PORT"}` adds a voter (as a learner first, caught up, then a
//! membership change), `DELETE /v1/cluster/members/{id}` removes one. Every answer is JSON; a
//! single node answers 404 `not_found` ("not a cluster node").

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};

use super::{admin_denied, error, error_with_status, Body};
use crate::protocol::ErrorCode;
use crate::shared::Shared;

fn node(s: &Shared) -> Result<&Arc<crate::cluster::node::Node>, HttpResponse> {
    s.cluster.as_ref().ok_or_else(|| error(ErrorCode::NotFound, "not a cluster node (cluster.node_id is 0)"))
}

/// `GET /v1/cluster/status`: `200 {"node_id", "role", "term", "leader", "commit_index",
/// "applied_index", "last_log_index", "members", "learners"}` (Raft indexes; `null` before the
/// first entry).
pub async fn status(s: web::Data<Arc<Shared>>) -> HttpResponse {
    match node(&s) {
        Ok(n) => HttpResponse::Ok().json(n.status().await),
        Err(r) => r,
    }
}

/// `POST /v1/cluster/members` `{"id": N, "addr": "HOST:PORT"}`: `200 {"members": [...]}` once
/// the node is a voter; 400 on a bad body; 503 `unavailable` when no leader could make the
/// change (with the reason).
pub async fn add(s: web::Data<Arc<Shared>>, req: HttpRequest, Body(body): Body) -> HttpResponse {
    if let Some(d) = admin_denied(&s, &req) {
        return d;
    }
    let n = match node(&s) {
        Ok(n) => n.clone(),
        Err(r) => return r,
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Add {
        id: u64,
        addr: String,
    }
    let a: Add = match super::json_object(&body) {
        Ok(a) => a,
        Err(e) => return error(ErrorCode::BadRequest, &format!("body must be {{\"id\": N, \"addr\": \"HOST:PORT\"}}: {e}")),
    };
    let port_ok = a.addr.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
    if a.id == 0 || !port_ok {
        return error(ErrorCode::BadRequest, "id must be above 0 and addr HOST:PORT");
    }
    match n.add_member(a.id, a.addr).await {
        Ok(()) => HttpResponse::Ok().json(serde_json::json!({ "members": n.status().await.members })),
        Err(e) => error_with_status(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, &format!("cannot add node {}: {e}", a.id)),
    }
}

/// `DELETE /v1/cluster/members/{id}`: `200 {"members": [...]}`; 503 `unavailable` when no
/// leader could make the change.
pub async fn remove(s: web::Data<Arc<Shared>>, req: HttpRequest, path: web::Path<String>) -> HttpResponse {
    if let Some(d) = admin_denied(&s, &req) {
        return d;
    }
    let n = match node(&s) {
        Ok(n) => n.clone(),
        Err(r) => return r,
    };
    let Ok(id) = path.parse::<u64>() else { return error(ErrorCode::BadRequest, "the node id must be a whole number") };
    match n.remove_member(id).await {
        Ok(()) => HttpResponse::Ok().json(serde_json::json!({ "members": n.status().await.members })),
        Err(e) => error_with_status(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, &format!("cannot remove node {id}: {e}")),
    }
}
