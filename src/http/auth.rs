//! `POST /v1/register`, `/v1/login`, `/v1/logout` (PROTOCOL.md §2).
//!
//! Passwords are hashed with argon2id (RFC 9106) on the blocking pool; tokens are 256 random bits,
//! given to the client once and stored only as their SHA-256.

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use argon2::password_hash::{Output, ParamsString, PasswordHash, Salt, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use serde::Deserialize;

use super::{error, pipeline_error};
pub use crate::tokens::{new_token, token_hash};
use crate::protocol::ids::{valid_device_id, valid_user_id};
use crate::protocol::ErrorCode;
use crate::shared::Shared;
use crate::storage::records::Command;
use crate::storage::{Outcome, Refusal};

/// Shortest and longest password, in bytes.
pub const PASSWORD_BYTES: std::ops::RangeInclusive<usize> = 8..=256;

fn argon2(s: &Shared) -> Argon2<'static> {
    let a = &s.cfg.auth;
    let params = Params::new(a.argon2_memory_kib, a.argon2_iterations, a.argon2_parallelism, None)
        .unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// How many password hashes may run at once: `auth.max_concurrent_hashes`, or one per CPU core
/// when it is 0.
pub fn hash_slots(cfg: &crate::config::Config) -> usize {
    match cfg.auth.max_concurrent_hashes {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n as usize,
    }
}

/// No hash slot came free within `auth.hash_wait_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashBusy;

/// Runs `f` (an argon2id hash or verification, which takes `auth.argon2_memory_kib` of memory)
/// on the blocking pool once one of the server's hash slots is free, waiting at most
/// `auth.hash_wait_ms`. Every password hash goes through here, so logins and registrations,
/// however many arrive at once, hold at most `slots × argon2_memory_kib` (a flood of them once
/// grew the server by gigabytes).
///
/// # Errors
/// [`HashBusy`] if no slot came free in time (the caller answers 503 `overloaded`, or XMPP's
/// `<temporary-auth-failure/>`), or if the blocking task was lost.
pub async fn hash_job<T: Send + 'static>(s: &Shared, f: impl FnOnce() -> T + Send + 'static) -> Result<T, HashBusy> {
    let wait = std::time::Duration::from_millis(s.cfg.auth.hash_wait_ms);
    let Ok(Ok(_slot)) = tokio::time::timeout(wait, s.hash_slots.acquire()).await else {
        metrics::counter!("parley_rate_limited_total", "what" => "password_hash").increment(1);
        return Err(HashBusy);
    };
    tokio::task::spawn_blocking(f).await.map_err(|_| HashBusy)
}

/// `503 overloaded` with a `Retry-After` of 1 s: every hash slot stayed busy.
fn hash_busy() -> HttpResponse {
    let mut r = error(ErrorCode::Overloaded, "too many logins and registrations at once; retry later");
    r.headers_mut().insert(actix_web::http::header::RETRY_AFTER, actix_web::http::header::HeaderValue::from_static("1"));
    r
}

/// argon2 working memory kept between hashes: one buffer per hash running, so at most
/// [`hash_slots`] buffers of `auth.argon2_memory_kib` each. A fresh buffer per hash (what
/// `argon2`'s `hash_password` does) was left in glibc's heap when freed, once glibc's dynamic
/// mmap threshold (mallopt(3)) had risen to its size: 1,000 logins held 1,089 MB. Mapping each
/// one apart instead cost every hash its page faults and zeroing.
static BLOCKS: parking_lot::Mutex<Vec<Vec<Block>>> = parking_lot::Mutex::new(Vec::new());

/// Runs `f` on `count` blocks of reused memory. argon2 writes every block before it reads it
/// (RFC 9106 §3.2), so what a buffer held before does not matter.
fn with_blocks<T>(count: usize, f: impl FnOnce(&mut [Block]) -> T) -> T {
    let mut b = BLOCKS.lock().pop().unwrap_or_default();
    if b.len() < count {
        b.resize(count, Block::default());
    }
    let r = f(&mut b[..count]);
    BLOCKS.lock().push(b);
    r
}

/// The raw argon2 output of `password` with `salt` (`out_len` bytes), in reused memory.
fn raw_hash(argon: &Argon2<'_>, password: &[u8], salt: Salt<'_>, out_len: usize) -> argon2::password_hash::Result<Output> {
    let mut salt_buf = [0u8; 64];
    let salt = salt.decode_b64(&mut salt_buf)?;
    let blocks = argon.params().block_count();
    Output::init_with(out_len, |out| with_blocks(blocks, |b| argon.hash_password_into_with_memory(password, salt, out, b)).map_err(Into::into))
}

/// The argon2id PHC string of `password` with `salt` under `argon`'s parameters, exactly as
/// `argon2`'s `PasswordHasher::hash_password` writes it.
fn phc_string(argon: &Argon2<'_>, password: &[u8], salt: &SaltString) -> argon2::password_hash::Result<String> {
    let params = argon.params();
    let hash = raw_hash(argon, password, salt.as_salt(), params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN))?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(params)?,
        salt: Some(salt.as_salt()),
        hash: Some(hash),
    };
    Ok(phc.to_string())
}

/// A new argon2id PHC string of `password`, with a random salt and the `[auth]` parameters
/// (blocking: call through [`hash_job`]).
///
/// # Errors
/// The parameters cannot hash (they are validated at start, so not in practice).
pub fn hash_password(s: &Shared, password: &str) -> argon2::password_hash::Result<String> {
    phc_string(&argon2(s), password.as_bytes(), &SaltString::generate(&mut rand::thread_rng()))
}

/// A PHC string of this server's argon2 parameters that no password is checked against for
/// real: a login for an unknown user is verified against it, so that it takes as long as one
/// with a wrong password. Made at the first such login (blocking: call it inside [`hash_job`]).
pub(crate) fn unknown_user_phc(s: &Shared) -> &'static str {
    static PHC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PHC.get_or_init(|| hash_password(s, "parley: no such user").unwrap_or_default())
}

/// Whether `password` matches the argon2 PHC string `phc`, under the parameters `phc` names
/// (blocking: call off the async workers, through [`hash_job`]). Also used by the XMPP
/// gateway's SASL PLAIN. The comparison takes the same time wherever the outputs differ.
pub fn verify_password(phc: &str, password: &str) -> bool {
    verify_phc(phc, password.as_bytes())
}

fn verify_phc(phc: &str, password: &[u8]) -> bool {
    let Ok(h) = PasswordHash::new(phc) else { return false };
    let (Some(salt), Some(expected)) = (h.salt, h.hash) else { return false };
    let Ok(algorithm) = Algorithm::try_from(h.algorithm) else { return false };
    let Ok(version) = h.version.map_or(Ok(Version::default()), Version::try_from) else { return false };
    let Ok(params) = Params::try_from(&h) else { return false };
    // Output's `==` is constant-time.
    raw_hash(&Argon2::new(algorithm, version, params), password, salt, expected.len()).is_ok_and(|out| out == expected)
}

#[derive(Deserialize)]
pub(crate) struct Credentials {
    user: String,
    password: String,
    #[serde(default)]
    device: Option<String>,
}

fn parse_body(body: &web::Bytes) -> Result<Credentials, HttpResponse> {
    super::json_object::<Credentials>(body)
        .map_err(|e| error(ErrorCode::BadRequest, &format!("body must be {{\"user\", \"password\"}}: {e}")))
}

/// `POST /v1/register`: `201 {"user"}`.
pub async fn register(s: web::Data<Arc<Shared>>, super::Body(body): super::Body) -> HttpResponse {
    let c = match parse_body(&body) {
        Ok(c) => c,
        Err(r) => return r,
    };
    if !s.cfg.server.registration_open {
        return error(ErrorCode::RegistrationClosed, "registration is closed");
    }
    if !valid_user_id(&c.user) {
        return error(ErrorCode::BadRequest, "user must be 1-32 chars of a-z 0-9 _ . -, starting with a letter or digit");
    }
    if !PASSWORD_BYTES.contains(&c.password.len()) {
        return error(ErrorCode::BadRequest, "password must be 8-256 bytes");
    }
    if let Err(why) = s.read_barrier().await {
        return error(ErrorCode::Unavailable, &format!("no quorum: {why}; retry"));
    }
    match s.state().user(&c.user) {
        Ok(Some(u)) if u.deleted => return error(ErrorCode::UserExists, "this id belonged to a deleted user; ids are never given out again"),
        Ok(Some(_)) => return error(ErrorCode::UserExists, "user exists"),
        Ok(None) => {}
        Err(_) => return error(ErrorCode::Unavailable, "storage unavailable"),
    }
    match register_user(&s, &c.user, c.password).await {
        Ok(Outcome::Done) => {
            metrics::counter!("parley_registrations_total").increment(1);
            HttpResponse::Created().json(serde_json::json!({ "user": c.user }))
        }
        Ok(Outcome::Refused(Refusal::UserExists)) => error(ErrorCode::UserExists, "user exists"),
        Ok(_) => error(ErrorCode::Internal, "unexpected outcome"),
        Err(e) => pipeline_error(e),
    }
}

/// Registers `user` with `password` through the log: the argon2id hash (`Register`), then the
/// SCRAM verifiers of the XMPP gateway (`SetScram`, RFC 5802/7677). Checks nothing else (the
/// callers check the switch, the id and the password length). Shared by `POST /v1/register` and
/// XMPP in-band registration (XEP-0077).
pub async fn register_user(s: &Arc<Shared>, user: &str, password: String) -> Result<Outcome, crate::storage::PipelineError> {
    let s2 = s.clone();
    let hashed = hash_job(s, move || {
        let phc = hash_password(&s2, &password);
        (phc, crate::xmpp::sasl::derive_verifiers(&password))
    })
    .await;
    let Ok(hashed) = hashed else { return Err(crate::storage::PipelineError::Overloaded) };
    let (Ok(password_hash), scram) = hashed else { return Ok(Outcome::Refused(Refusal::BadRequest("cannot hash the password".into()))) };
    let out = s.pipeline.call(Command::Register { user: user.to_owned(), password_hash }).await?;
    if out == Outcome::Done {
        if let Some(scram) = scram {
            // Best effort: without verifiers, SCRAM fails and PLAIN (which adds them) still works.
            let _ = s.pipeline.call(Command::SetScram { user: user.to_owned(), scram }).await;
        }
    }
    Ok(out)
}

/// A login attempt's token from the failed-login limiter, taken before the password is
/// checked: given back when dropped unless the attempt failed. Taking it only after a failed
/// check let concurrent guesses all pass an empty bucket (300 at once were all checked).
struct Attempt<'a> {
    limiter: &'a crate::limits::RateLimiter,
    ip: &'a str,
    failed: bool,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.failed {
            self.limiter.refund(self.ip);
        }
    }
}

/// `POST /v1/login`: `200 {"token", "user", "device"}`. After `failed_login_burst` failures from
/// one IP (counting the attempts still being checked), every login from it gets `429
/// rate_limited`, with a `Retry-After` (whole seconds, at least 1) of when its bucket has a token
/// again.
pub async fn login(s: web::Data<Arc<Shared>>, req: HttpRequest, super::Body(body): super::Body) -> HttpResponse {
    let ip = req.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
    if !s.login_limiter.allow(&ip) {
        metrics::counter!("parley_rate_limited_total", "what" => "login").increment(1);
        let secs = s.login_limiter.retry_after(&ip).as_secs_f64().ceil().clamp(1.0, 86_400.0) as u64;
        let mut r = error(ErrorCode::RateLimited, &format!("too many failed logins from this address; retry in {secs} s"));
        r.headers_mut().insert(actix_web::http::header::RETRY_AFTER, actix_web::http::header::HeaderValue::from(secs));
        return r;
    }
    let mut attempt = Attempt { limiter: &s.login_limiter, ip: &ip, failed: false };
    let failed = |attempt: &mut Attempt<'_>| {
        attempt.failed = true;
        metrics::counter!("parley_logins_total", "result" => "failed").increment(1);
        error(ErrorCode::Unauthorized, "wrong user or password")
    };
    let c = match parse_body(&body) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let device = c.device.clone().unwrap_or_else(|| "web".to_owned());
    if !valid_device_id(&device) {
        return error(ErrorCode::BadRequest, "device must be 1-32 chars of a-z 0-9 _ . -");
    }
    if !valid_user_id(&c.user) || !PASSWORD_BYTES.contains(&c.password.len()) {
        return failed(&mut attempt);
    }
    // On a cluster node: a user registered through another node is known here.
    if let Err(why) = s.read_barrier().await {
        return error(ErrorCode::Unavailable, &format!("no quorum: {why}; retry"));
    }
    let rec = match s.state().user(&c.user) {
        Ok(r) => r,
        Err(_) => return error(ErrorCode::Unavailable, "storage unavailable"),
    };
    // An unknown user costs the same argon2 verification as a wrong password, so the answer's
    // time does not tell whether the user exists (OWASP's authentication cheat sheet).
    let shared = s.get_ref().clone();
    let verify = move || match rec {
        Some(rec) => verify_password(&rec.password_hash, &c.password),
        None => {
            verify_password(unknown_user_phc(&shared), &c.password);
            false
        }
    };
    let Ok(ok) = hash_job(&s, verify).await else {
        return hash_busy();
    };
    if !ok {
        return failed(&mut attempt);
    }
    let token = new_token();
    let cmd = Command::Login { token_hash: token_hash(&token), user: c.user.clone(), device: device.clone() };
    match s.pipeline.call(cmd).await {
        Ok(Outcome::Done) => {
            metrics::counter!("parley_logins_total", "result" => "ok").increment(1);
            HttpResponse::Ok().json(serde_json::json!({ "token": token, "user": c.user, "device": device }))
        }
        Ok(_) => failed(&mut attempt),
        Err(e) => pipeline_error(e),
    }
}

/// `POST /v1/logout` with `Authorization: Bearer TOKEN`: `204`; that token's sockets close 4001.
pub async fn logout(s: web::Data<Arc<Shared>>, req: HttpRequest) -> HttpResponse {
    let Some(token) = super::bearer(&req) else { return error(ErrorCode::Unauthorized, "missing bearer token") };
    match s.pipeline.call(Command::Logout { token_hash: token_hash(token) }).await {
        Ok(Outcome::Done) => HttpResponse::NoContent().finish(),
        Ok(_) => error(ErrorCode::Unauthorized, "unknown token"),
        Err(e) => pipeline_error(e),
    }
}

#[cfg(test)]
mod tests {
    use argon2::password_hash::{PasswordHasher, PasswordVerifier};

    use super::*;

    fn argon(m_kib: u32, t: u32) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, Params::new(m_kib, t, 1, None).expect("params"))
    }

    /// The hash in reused memory is the library's, byte for byte, and each verifies the other's.
    #[test]
    fn hashes_in_reused_memory_are_the_librarys() {
        for (m, t) in [(64, 1), (256, 2), (64, 3)] {
            let a = argon(m, t);
            let salt = SaltString::generate(&mut rand::thread_rng());
            let ours = phc_string(&a, b"correct horse", &salt).expect("hash");
            // A larger buffer from the previous round is reused for a smaller hash, and back.
            assert_eq!(ours, a.hash_password(b"correct horse", &salt).expect("library hash").to_string(), "m={m} t={t}");
            assert!(a.verify_password(b"correct horse", &PasswordHash::new(&ours).expect("parse")).is_ok());
            assert!(verify_phc(&ours, b"correct horse"));
            assert!(!verify_phc(&ours, b"correct horsf"), "a wrong password");
        }
    }

    /// A stored hash verifies under its own parameters, whatever the configured ones are now.
    #[test]
    fn a_hash_verifies_under_the_parameters_it_names() {
        let salt = SaltString::generate(&mut rand::thread_rng());
        let old = argon(128, 2).hash_password(b"hunter42hunter42", &salt).expect("hash").to_string();
        assert!(verify_phc(&old, b"hunter42hunter42"));
        assert!(!verify_phc(&old, b"hunter42hunter43"));
        for bad in ["", "$argon2id$", "not a hash", &old.replace("argon2id", "argon9")] {
            assert!(!verify_phc(bad, b"hunter42hunter42"), "{bad:?}");
        }
    }
}
