//! XEP-0045 multi-user chat over parley groups: every group is a members-only, persistent room
//! `<group id>@conference.<domain>`; the nick is the user id.

use actix::prelude::*;
use minidom::Element;

use super::session::XmppSession;
use super::stanza::error_reply;
use crate::protocol::GroupView;

/// The stanzas of a group membership event for this resource (none yet).
pub fn group_event(_s: &mut XmppSession, _g: &GroupView) -> Vec<Element> {
    Vec::new()
}

/// A presence to a room (join / leave).
pub fn presence(s: &mut XmppSession, el: Element, _ctx: &mut Context<XmppSession>) {
    let e = error_reply(&el, None, "cancel", "service-unavailable", Some("rooms are not available yet"));
    s.send_el(&e);
}
