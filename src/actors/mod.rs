//! The actors: one [`session::Session`] per socket, the [`registry::Registry`] of online devices,
//! and the [`presence::PresenceHub`].

pub mod messages;
pub mod ops;
pub mod presence;
pub mod registry;
pub mod session;
pub mod socket;
