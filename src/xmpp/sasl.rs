//! SASL for the gateway (RFC 6120 §6) with the `sasl` crate's server mechanisms: PLAIN
//! (RFC 4616) checked against the user's argon2id hash, SCRAM-SHA-1 (RFC 5802) and
//! SCRAM-SHA-256 (RFC 7677) against the verifiers stored through the log
//! ([`Command::SetScram`](crate::storage::records::Command::SetScram)).

use std::sync::Arc;

use rand::RngCore;
use sasl::common::scram::{Sha1, Sha256};
use sasl::common::{ChannelBinding, Identity};
use sasl::secret::{Pbkdf2Sha1, Pbkdf2Sha256, Plain};
use sasl::server::mechanisms::{Plain as PlainMech, Scram};
use sasl::server::{Mechanism, Provider, ProviderError, Validator, ValidatorError};

use crate::protocol::ids::valid_user_id;
use crate::shared::Shared;
use crate::storage::records::{ScramRecord, ScramVerifier};

/// PBKDF2 iterations of new SCRAM verifiers (RFC 7677 §4 asks for at least 4096).
pub const SCRAM_ITERATIONS: u32 = 4096;

/// The mechanisms offered, strongest first.
pub const MECHANISMS: [&str; 3] = ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"];

/// SCRAM verifiers of `password` with a fresh 16-byte salt each (RFC 5802 §3: SaltedPassword).
pub fn derive_verifiers(password: &str) -> Option<ScramRecord> {
    let mut rng = rand::thread_rng();
    let (mut s1, mut s256) = ([0u8; 16], [0u8; 16]);
    rng.fill_bytes(&mut s1);
    rng.fill_bytes(&mut s256);
    let a = Pbkdf2Sha1::derive(password, &s1, SCRAM_ITERATIONS).ok()?;
    let b = Pbkdf2Sha256::derive(password, &s256, SCRAM_ITERATIONS).ok()?;
    Some(ScramRecord {
        sha1: ScramVerifier { salt: a.salt, iterations: a.iterations, salted_password: a.digest },
        sha256: ScramVerifier { salt: b.salt, iterations: b.iterations, salted_password: b.digest },
    })
}

/// Looks users up for the mechanisms; runs on the blocking pool (argon2 is slow on purpose).
#[derive(Clone)]
pub struct Users {
    pub shared: Arc<Shared>,
}

fn username(identity: &Identity) -> Option<&str> {
    match identity {
        Identity::Username(u) if valid_user_id(u) => Some(u),
        _ => None,
    }
}

impl Users {
    fn verifiers(&self, identity: &Identity) -> Result<ScramRecord, ProviderError> {
        let u = username(identity).ok_or(ProviderError::AuthenticationFailed)?;
        match self.shared.state().user(u) {
            Ok(Some(rec)) if !rec.deleted => {}
            _ => return Err(ProviderError::AuthenticationFailed),
        }
        self.shared.state().scram(u).ok().flatten().ok_or(ProviderError::AuthenticationFailed)
    }
}

impl Provider<Pbkdf2Sha1> for Users {
    fn provide(&self, identity: &Identity) -> Result<Pbkdf2Sha1, ProviderError> {
        let v = self.verifiers(identity)?.sha1;
        Ok(Pbkdf2Sha1 { salt: v.salt, iterations: v.iterations, digest: v.salted_password })
    }
}

impl Provider<Pbkdf2Sha256> for Users {
    fn provide(&self, identity: &Identity) -> Result<Pbkdf2Sha256, ProviderError> {
        let v = self.verifiers(identity)?.sha256;
        Ok(Pbkdf2Sha256 { salt: v.salt, iterations: v.iterations, digest: v.salted_password })
    }
}

sasl::impl_validator_using_provider!(Users, Pbkdf2Sha1);
sasl::impl_validator_using_provider!(Users, Pbkdf2Sha256);

impl Validator<Plain> for Users {
    fn validate(&self, identity: &Identity, value: &Plain) -> Result<(), ValidatorError> {
        let u = username(identity).ok_or(ValidatorError::AuthenticationFailed)?;
        let rec = match self.shared.state().user(u) {
            Ok(Some(rec)) if !rec.deleted => rec,
            Ok(_) => {
                // As long as a wrong password takes (see `http::auth::login`).
                crate::http::auth::verify_password(crate::http::auth::unknown_user_phc(&self.shared), &value.0);
                return Err(ValidatorError::AuthenticationFailed);
            }
            Err(_) => return Err(ValidatorError::AuthenticationFailed),
        };
        if crate::http::auth::verify_password(&rec.password_hash, &value.0) {
            Ok(())
        } else {
            Err(ValidatorError::AuthenticationFailed)
        }
    }
}

/// A server mechanism by its name (one of [`MECHANISMS`]), or None. `initial` is the client's
/// initial response.
///
/// Channel binding: no `-PLUS` mechanism is offered, so a SCRAM client answers `y` (it could bind,
/// the server cannot) or `n` (it cannot) in its GS2 header (RFC 5802 §6). The `sasl` crate's
/// server accepts only `y` with `ChannelBinding::None`, and only `n` with a binding it supports; so
/// an `n` client gets an empty `TlsUnique` binding, under which the final `c=` it must send is
/// exactly `biws` (base64 of `n,,`), as RFC 5802 wants. A `p=` client fails (nothing to bind).
pub fn mechanism(name: &str, users: Users, initial: &[u8]) -> Option<Box<dyn Mechanism + Send>> {
    let binding = if initial.first() == Some(&b'y') { ChannelBinding::None } else { ChannelBinding::TlsUnique(Vec::new()) };
    Some(match name {
        "PLAIN" => Box::new(PlainMech::new(users)),
        "SCRAM-SHA-1" => Box::new(Scram::<Sha1, _>::new(users, binding)),
        "SCRAM-SHA-256" => Box::new(Scram::<Sha256, _>::new(users, binding)),
        _ => return None,
    })
}

/// For PLAIN: the password in an initial response `authzid NUL authcid NUL passwd` (RFC 4616
/// §2), so a user without SCRAM verifiers (registered before the gateway) gets them after its
/// first PLAIN login.
pub fn plain_password(payload: &[u8]) -> Option<String> {
    let mut parts = payload.split(|b| *b == 0);
    parts.next()?;
    parts.next()?;
    String::from_utf8(parts.next()?.to_vec()).ok()
}

/// Whether the initial response of `mechanism` names an authorization identity other than its
/// authentication identity: PLAIN `authzid NUL authcid NUL passwd` (RFC 4616 §2), SCRAM's GS2
/// header `n,a=authzid,n=authcid,...` (RFC 5802 §7). parley lets a user act only as itself, so an
/// authzid is accepted only when it is the authcid or its bare JID `authcid@domain`; any other is
/// refused with `invalid-authzid` (RFC 6120 §6.5.6) before the password is looked at.
pub fn foreign_authzid(mechanism: &str, initial: &[u8], domain: &str) -> bool {
    let (authzid, authcid) = match mechanism {
        "PLAIN" => {
            let mut parts = initial.splitn(3, |b| *b == 0);
            let (Some(z), Some(c)) = (parts.next(), parts.next()) else { return false };
            (String::from_utf8_lossy(z).into_owned(), String::from_utf8_lossy(c).into_owned())
        }
        m if m.starts_with("SCRAM-") => {
            let text = String::from_utf8_lossy(initial);
            let mut fields = text.splitn(4, ',');
            let (_flag, z, c) = (fields.next(), fields.next().unwrap_or(""), fields.next().unwrap_or(""));
            let unescape = |s: &str| s.replace("=2C", ",").replace("=3D", "=");
            (unescape(z.strip_prefix("a=").unwrap_or("")), unescape(c.strip_prefix("n=").unwrap_or("")))
        }
        _ => return false,
    };
    !(authzid.is_empty() || authzid == authcid || authzid == format!("{authcid}@{domain}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_authzid_must_be_the_user_itself() {
        assert!(!foreign_authzid("PLAIN", b"\0alice\0pw", "localhost"));
        assert!(!foreign_authzid("PLAIN", b"alice\0alice\0pw", "localhost"));
        assert!(!foreign_authzid("PLAIN", b"alice@localhost\0alice\0pw", "localhost"));
        assert!(foreign_authzid("PLAIN", b"bob\0alice\0pw", "localhost"));
        assert!(foreign_authzid("PLAIN", b"bob@localhost\0alice\0pw", "localhost"));
        assert!(!foreign_authzid("SCRAM-SHA-256", b"n,,n=alice,r=abc", "localhost"));
        assert!(!foreign_authzid("SCRAM-SHA-1", b"y,a=alice@localhost,n=alice,r=abc", "localhost"));
        assert!(foreign_authzid("SCRAM-SHA-256", b"n,a=bob,n=alice,r=abc", "localhost"));
    }
}
