//! XEP-0045 multi-user chat over parley groups: every group is a members-only, persistent room
//! `<group id>@conference.<domain>`; the nick is the user id, members are its affiliations
//! (group admins are owners). Joining is presence to `room/nick`; only members may join
//! (`registration-required` otherwise). Group messages reach every member's devices through
//! the event stream whether or not a resource joined, as `groupchat` from `room/sender`; a
//! member's own messages come back to its resources as the MUC reflection (XEP-0045 §7.4), never
//! as carbons (XEP-0280 §6.5). Membership changes (parley `group` events) become presence.

use actix::prelude::*;
use minidom::Element;

use super::session::XmppSession;
use super::stanza::{attr, build, error_reply, ns, text_el};
use crate::protocol::ids::valid_group_id;
use crate::protocol::{GroupAction, GroupView};
use crate::storage::records::GroupRecord;

/// The `<x xmlns='…muc#user'/>` of one occupant, with XEP-0045 status codes.
fn user_x(affiliation: &str, role: &str, jid: Option<&str>, codes: &[u16]) -> Element {
    let mut item = build!("item", ns::MUC_USER, "affiliation" => affiliation, "role" => role);
    if let Some(j) = jid {
        item = item.attr(rxml::xml_ncname!("jid").into(), j);
    }
    let mut x = Element::builder("x", ns::MUC_USER).append(item.build());
    for c in codes {
        x = x.append(build!("status", ns::MUC_USER, "code" => c.to_string()).build());
    }
    x.build()
}

fn occupant(s: &XmppSession, room: &str, user: &str, admin: bool, available: bool, codes: &[u16]) -> Element {
    let mut p = build!("presence", ns::CLIENT, "from" => format!("{room}/{user}"), "to" => s.jid());
    if !available {
        p = p.attr(rxml::xml_ncname!("type").into(), "unavailable");
    }
    let (aff, role) = match (available, admin) {
        (false, _) => ("none", "none"),
        (true, true) => ("owner", "moderator"),
        (true, false) => ("member", "participant"),
    };
    p.append(user_x(aff, role, Some(&s.bare_of(user)), codes)).build()
}

/// The stanzas of a group membership event for this resource: presence of the users who came or
/// went (with status 110 when it is this user, 321 when it was removed).
pub fn group_event(s: &mut XmppSession, g: &GroupView) -> Vec<Element> {
    let room = s.room_jid(&g.group);
    let me = s.user().to_owned();
    let id = g.group.trim_start_matches("g:");
    let admins: Vec<String> = s.shared().state.group(id).ok().flatten().map(admins_of).unwrap_or_default();
    g.users
        .iter()
        .map(|u| {
            let came = matches!(g.action, GroupAction::Created | GroupAction::Added);
            let mut codes = Vec::new();
            if *u == me {
                codes.push(110);
                if g.action == GroupAction::Removed {
                    codes.push(321);
                }
            }
            occupant(s, &room, u, admins.contains(u), came, &codes)
        })
        .collect()
}

fn admins_of(g: GroupRecord) -> Vec<String> {
    g.members.into_iter().filter(|m| m.admin).map(|m| m.user).collect()
}

/// A presence to a room: a join (the members as occupants, then this user's own presence with
/// status 110, then the subject: the group's name) or a leave.
pub fn presence(s: &mut XmppSession, el: Element, _ctx: &mut Context<XmppSession>) {
    let Some(to) = attr!(el, "to").and_then(|t| jid::Jid::new(t).ok()) else { return };
    let Some(node) = to.node().map(|n| n.as_str().to_owned()) else {
        let e = error_reply(&el, None, "modify", "jid-malformed", Some("a room is room@service/nick"));
        s.send_el(&e);
        return;
    };
    let room = format!("{node}@{}", s.muc_service());
    let me = s.user().to_owned();
    let group = if valid_group_id(&node) { s.shared().state.group(&node).ok().flatten() } else { None };
    let Some(group) = group.filter(|g| g.members.iter().any(|m| m.user == me)) else {
        // Members-only (XEP-0045 §7.2.5); rooms are created as parley groups.
        let mut e = error_reply(&el, Some(&format!("{room}/{me}")), "auth", "registration-required", Some("only members of the group may join"));
        // XEP-0045 §7.2.6: the error presence carries the <x/> of the join.
        e.append_child(Element::builder("x", ns::MUC).build());
        s.send_el(&e);
        return;
    };
    if attr!(el, "type") == Some("unavailable") {
        let p = occupant(s, &room, &me, false, false, &[110]);
        s.send_el(&p);
        return;
    }
    let admins = admins_of(group.clone());
    for m in group.members.iter().filter(|m| m.user != me) {
        let p = occupant(s, &room, &m.user, m.admin, true, &[]);
        s.send_el(&p);
    }
    // 110: this is you; 100: the room is non-anonymous (JIDs are shown); the nick is the user id
    // whatever was asked (210: the service changed it).
    let asked = to.resource().map(|r| r.as_str().to_owned());
    let mut codes = vec![110, 100];
    if asked.as_deref() != Some(me.as_str()) {
        codes.push(210);
    }
    let p = occupant(s, &room, &me, admins.contains(&me), true, &codes);
    s.send_el(&p);
    let subject = build!("message", ns::CLIENT, "from" => room.as_str(), "to" => s.jid(), "type" => "groupchat")
        .append(text_el("subject", ns::CLIENT, group.name.as_str()))
        .build();
    s.send_el(&subject);
}
