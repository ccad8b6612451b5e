//! Session tokens: 256 random bits, given to the client once (login, XMPP bind) and stored only
//! as their SHA-256 ([`TokenHash`]). Used by `http/` (login, logout), `actors/` (a session's
//! `hello`) and `xmpp/` (SASL, resumption ids).

use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::storage::records::TokenHash;

/// SHA-256 of a token: what the server stores.
pub fn token_hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// A new random token: 32 bytes (256 bits), hex.
pub fn new_token() -> String {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}
