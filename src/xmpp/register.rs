//! XEP-0077 in-band registration: the same checks and the same commands as `POST /v1/register`
//! (`server.registration_open`, the user id rules, 8-256 byte passwords, argon2id and the SCRAM
//! verifiers through the log), before authentication.
//!
//! Like SASL, it needs TLS unless `xmpp.allow_plaintext` allows a plaintext stream: XEP-0077's
//! Security Considerations say registration SHOULD NOT be used over an unsecured channel. The
//! feature is not advertised then, and a `jabber:iq:register` iq (get or set) gets
//! `<not-authorized/>` (type `modify`), the condition XEP-0077 §3.3 gives for "the channel is
//! not safe enough"; after STARTTLS the same stream may register.

use actix::prelude::*;
use minidom::Element;

use super::session::XmppSession;
use super::stanza::{attr, build, empty, error_reply, ns, text_el};
use crate::protocol::ids::valid_user_id;
use crate::storage::{Outcome, Refusal};

/// Answers an in-band registration iq (`get`: the form; `set`: register).
pub fn in_band(s: &mut XmppSession, iq: Element, q: Element, ctx: &mut Context<XmppSession>) {
    let reply_err = |s: &mut XmppSession, kind: &str, cond: &str, text: &str| {
        let e = error_reply(&iq, None, kind, cond, Some(text));
        s.send_el(&e);
    };
    if !s.is_pre_auth() {
        // Password change and account removal are not offered over XMPP.
        return reply_err(s, "cancel", "not-allowed", "change the password with parley's tools");
    }
    if !s.sasl_allowed() {
        return reply_err(s, "modify", "not-authorized", "register over TLS (STARTTLS) only");
    }
    if !s.shared().cfg.server.registration_open {
        return reply_err(s, "cancel", "not-allowed", "registration is closed");
    }
    let id = attr!(iq, "id").unwrap_or("").to_owned();
    match attr!(iq, "type") {
        Some("get") => {
            let form = Element::builder("query", ns::REGISTER)
                .append(text_el("instructions", ns::REGISTER, "Choose a user id (a-z 0-9 _ . -) and a password of 8-256 bytes."))
                .append(empty("username", ns::REGISTER))
                .append(empty("password", ns::REGISTER))
                .build();
            let r = build!("iq", ns::CLIENT, "type" => "result", "id" => id).append(form).build();
            s.send_el(&r);
        }
        Some("set") => {
            let user = q.get_child("username", ns::REGISTER).map(|u| u.text()).unwrap_or_default();
            let password = q.get_child("password", ns::REGISTER).map(|p| p.text()).unwrap_or_default();
            if !valid_user_id(&user) {
                return reply_err(s, "modify", "not-acceptable", "user must be 1-32 chars of a-z 0-9 _ . -, starting with a letter or digit");
            }
            if !crate::http::auth::PASSWORD_BYTES.contains(&password.len()) {
                return reply_err(s, "modify", "not-acceptable", "password must be 8-256 bytes");
            }
            let shared = s.shared().clone();
            let fut = async move { crate::http::auth::register_user(&shared, &user, password).await };
            ctx.wait(fut.into_actor(s).map(move |res, act, _| {
                let r = match res {
                    Ok(Outcome::Done) => {
                        metrics::counter!("parley_registrations_total").increment(1);
                        build!("iq", ns::CLIENT, "type" => "result", "id" => id).build()
                    }
                    Ok(Outcome::Refused(Refusal::UserExists)) => error_reply(&iq, None, "cancel", "conflict", Some("user exists")),
                    Ok(_) => error_reply(&iq, None, "wait", "internal-server-error", Some("cannot register")),
                    Err(_) => error_reply(&iq, None, "wait", "resource-constraint", Some("the server is busy; retry")),
                };
                act.send_el(&r);
            }));
        }
        _ => reply_err(s, "modify", "bad-request", "get or set"),
    }
}
