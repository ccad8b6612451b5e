//! The XMPP gateway: existing XMPP clients use parley unmodified.
//!
//! It translates XMPP into the same commands and events a native session uses; it never bypasses
//! the log and keeps no messages of its own. Transports: client-to-server TCP (RFC 6120) on
//! `xmpp.listen` ([`tcp`]), XMPP over WebSocket (RFC 7395) at `/xmpp-websocket` ([`ws`]). A JID
//! is `user@xmpp.domain/device`: the resource is the parley device.
//!
//! | module | what |
//! | --- | --- |
//! | [`parser`] | rxml push parser for TCP streams, one-element frames for WebSocket |
//! | [`stanza`] | namespaces, element helpers, archive ids, timestamps |
//! | [`sasl`] | PLAIN (RFC 4616), SCRAM-SHA-1 (RFC 5802), SCRAM-SHA-256 (RFC 7677); verifiers |
//! | [`session`] | the session actor: stream, SASL, bind, roster, presence, chat, receipts, markers, chat states, carbons, disco, ping |
//! | [`mam`] | XEP-0313 archive queries over `history` |
//! | [`register`] | XEP-0077 in-band registration |
//! | [`sm`] | XEP-0198 stream management and resumption over the device cursor |
//! | [`muc`] | XEP-0045 rooms over groups |

pub mod mam;
pub mod muc;
pub mod parser;
pub mod register;
pub mod sasl;
pub mod sm;
pub mod session;
pub mod stanza;
pub mod tcp;
pub mod ws;
