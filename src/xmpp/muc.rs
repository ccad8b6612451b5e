//! XEP-0045 multi-user chat over parley groups: every group is a members-only, persistent room
//! `<group id>@conference.<domain>`; the nick is the user id, members are its affiliations
//! (group admins are owners). Joining is presence to `room/nick`; only members may join
//! (`registration-required` otherwise). Group messages reach every member's devices through
//! the event stream whether or not a resource joined, as `groupchat` from `room/sender`; a
//! member's own messages come back to its resources as the MUC reflection (XEP-0045 §7.4), never
//! as carbons (XEP-0280 §6.5). Membership changes (parley `group` events) become presence.
//!
//! What changes a room, and the parley command it is:
//! - **Creation** (XEP-0045 §10.1.1): a join (presence with `<x xmlns='…muc'/>`) to a room that
//!   does not exist creates the group with that id (`GroupCreate`, the joiner its only member and
//!   admin, named after the id); the presence says 201. The room is usable at once: parley groups
//!   have one configuration (members-only, persistent, non-anonymous), so there is no locked state.
//!   The owner's configuration form (§10.1.3) shows it; submitting it (the instant room of
//!   §10.1.2: an empty submit) is accepted when it asks for nothing else, `not-acceptable` otherwise.
//! - **Mediated invitations** (§7.8.2): an invite from a group admin adds the invitee to the
//!   group (`GroupAdd`; a members-only room adds invitees to its member list); the invitee gets the
//!   invitation from the room, rendered from its `group` event (so an offline invitee gets it
//!   too, once). An invite from a non-admin is refused (`forbidden`), as parley's admin rule says.
//! - **Affiliations** (§9.3, §9.4, §10.3): an admin setting `member` is `GroupAdd`, `none` or
//!   `outcast` is `GroupRemove`; a member setting its own affiliation to `none` leaves the group
//!   (`GroupLeave`); `admin` and `owner` cannot be granted (parley has no promotion):
//!   `not-allowed`. Refusals come from apply, in log order, and become stanza errors.
//! - **Leaving the room** (unavailable presence, §7.14) ends the occupancy only: the user stays
//!   a member, as in any persistent members-only room.

use actix::prelude::*;
use minidom::Element;

use super::session::XmppSession;
use super::stanza::{attr, build, error_reply, ns, text_el};
use crate::protocol::ids::valid_group_id;
use crate::protocol::{GroupAction, GroupView};
use crate::storage::records::{Command, GroupRecord};
use crate::storage::{Outcome, Refusal};

/// XEP-0045 §10 (room configuration).
pub const NS_OWNER: &str = "http://jabber.org/protocol/muc#owner";
/// XEP-0045 §9 (affiliation lists).
pub const NS_ADMIN: &str = "http://jabber.org/protocol/muc#admin";

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

/// XEP-0045 §7.8.2: the room forwards the invitation when this user was put in the group by
/// someone else (added, or a member from its creation).
fn invitation(s: &XmppSession, g: &GroupView) -> Option<Element> {
    let me = s.user();
    let invited = matches!(g.action, GroupAction::Added | GroupAction::Created) && g.users.iter().any(|u| u == me) && g.by != me;
    invited.then(|| {
        let inv = build!("invite", ns::MUC_USER, "from" => s.bare_of(&g.by)).build();
        build!("message", ns::CLIENT, "from" => s.room_jid(&g.group).as_str(), "to" => s.bare_of(me))
            .append(Element::builder("x", ns::MUC_USER).append(inv).build())
            .build()
    })
}

/// The stanzas of a group event from before this resource bound (the backlog of a new
/// resource): the invitation only, and only while this user is still a member; never the
/// occupant presences, which would tell a client about rooms it never joined (a fresh client
/// then took a stale self-presence for the answer to its join). A resource learns the
/// occupants when it joins.
pub fn backlog_group_event(s: &mut XmppSession, g: &GroupView) -> Vec<Element> {
    let id = g.group.trim_start_matches("g:");
    let me = s.user().to_owned();
    let member = s.shared().state().group(id).ok().flatten().is_some_and(|gr| gr.members.iter().any(|m| m.user == me));
    if !member {
        return Vec::new();
    }
    invitation(s, g).into_iter().collect()
}

/// The stanzas of a group membership event for this resource: presence of the users who came or
/// went (with status 110 when it is this user, 321 when it was removed).
pub fn group_event(s: &mut XmppSession, g: &GroupView) -> Vec<Element> {
    let room = s.room_jid(&g.group);
    let me = s.user().to_owned();
    let id = g.group.trim_start_matches("g:");
    let admins: Vec<String> = s.shared().state().group(id).ok().flatten().map(admins_of).unwrap_or_default();
    let mut out: Vec<Element> = invitation(s, g).into_iter().collect();
    out.extend(g.users
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
        }));
    out
}

fn admins_of(g: GroupRecord) -> Vec<String> {
    g.members.into_iter().filter(|m| m.admin).map(|m| m.user).collect()
}

/// A presence to a room: a join (the members as occupants, then this user's own presence with
/// status 110, then the subject: the group's name) or a leave.
pub fn presence(s: &mut XmppSession, el: Element, ctx: &mut Context<XmppSession>) {
    let Some(to) = attr!(el, "to").and_then(|t| jid::Jid::new(t).ok()) else { return };
    let Some(node) = to.node().map(|n| n.as_str().to_owned()) else {
        let e = error_reply(&el, None, "modify", "jid-malformed", Some("a room is room@service/nick"));
        s.send_el(&e);
        return;
    };
    let room = format!("{node}@{}", s.muc_service());
    let me = s.user().to_owned();
    let group = if valid_group_id(&node) { s.shared().state().group(&node).ok().flatten() } else { None };
    let join = el.has_child("x", ns::MUC) && attr!(el, "type").is_none();
    if group.is_none() && join && valid_group_id(&node) {
        return create(s, el, node, ctx);
    }
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
    joined(s, &el, &room, &group, &[]);
}

/// The join's answer: the other members as occupants, this user's own presence (110, 100,
/// 210 when the nick was changed, plus `extra`), the subject.
fn joined(s: &mut XmppSession, el: &Element, room: &str, group: &GroupRecord, extra: &[u16]) {
    let me = s.user().to_owned();
    let Some(to) = attr!(el, "to").and_then(|t| jid::Jid::new(t).ok()) else { return };
    let admins = admins_of(group.clone());
    for m in group.members.iter().filter(|m| m.user != me) {
        let p = occupant(s, room, &m.user, m.admin, true, &[]);
        s.send_el(&p);
    }
    // 110: this is you; 100: the room is non-anonymous (JIDs are shown); the nick is the user id
    // whatever was asked (210: the service changed it).
    let asked = to.resource().map(|r| r.as_str().to_owned());
    let mut codes = vec![110, 100];
    if asked.as_deref() != Some(me.as_str()) {
        codes.push(210);
    }
    codes.extend_from_slice(extra);
    let p = occupant(s, room, &me, admins.contains(&me), true, &codes);
    s.send_el(&p);
    let subject = build!("message", ns::CLIENT, "from" => room, "to" => s.jid(), "type" => "groupchat")
        .append(text_el("subject", ns::CLIENT, group.name.as_str()))
        .build();
    s.send_el(&subject);
}

/// A join to a room that does not exist: the group `node` is created with this user as its admin
/// (XEP-0045 §10.1.1); the answer is the join's, with status 201 (room created).
fn create(s: &mut XmppSession, el: Element, node: String, ctx: &mut Context<XmppSession>) {
    let me = s.user().to_owned();
    let cap = s.shared().cfg.limits_group_members();
    let cmd = Command::GroupCreate { group: node.clone(), by: me.clone(), name: node.clone(), members: Vec::new(), cap };
    let shared = s.shared().clone();
    let fut = async move { shared.pipeline.call(cmd).await };
    ctx.wait(fut.into_actor(s).map(move |res, s, _| {
        let room = format!("{node}@{}", s.muc_service());
        let group = s.shared().state().group(&node).ok().flatten().filter(|g| g.members.iter().any(|m| m.user == me));
        match (res, group) {
            (Ok(Outcome::GroupCreated { .. }), Some(g)) => joined(s, &el, &room, &g, &[201]),
            _ => {
                // Taken meanwhile by someone else's creation (apply decides, in log order), or
                // the storage refused: as for any room this user is not a member of.
                let mut e = error_reply(&el, Some(&format!("{room}/{me}")), "auth", "registration-required", Some("only members of the group may join"));
                e.append_child(Element::builder("x", ns::MUC).build());
                s.send_el(&e);
            }
        }
    }));
}

/// The group of a room JID (`id@conference.domain`), when `to` is one.
fn room_group(s: &XmppSession, to: Option<&str>) -> Option<String> {
    let j = jid::Jid::new(to?).ok()?;
    let node = j.node()?.as_str().to_owned();
    (j.domain().as_str() == s.muc_service() && valid_group_id(&node)).then_some(node)
}

/// The stanza error of a refused group command (XEP-0045 §9, §10 error cases).
fn refusal(r: &Refusal) -> (&'static str, &'static str, &'static str) {
    match r {
        Refusal::NotAdmin => ("auth", "forbidden", "only a group admin may do this"),
        Refusal::NotMember => ("auth", "forbidden", "not a member of this room"),
        Refusal::UnknownUser(_) => ("cancel", "item-not-found", "no such user"),
        Refusal::TooLarge(_) => ("wait", "service-unavailable", "the room is full"),
        _ => ("modify", "not-acceptable", "refused"),
    }
}

/// Submits `cmd` and answers `req` (an iq, or a message for an invite) when it is decided: an
/// iq result, or the stanza error of the refusal (or none for a message that went through).
fn submit(s: &mut XmppSession, req: Element, cmd: Command, ctx: &mut Context<XmppSession>) {
    let shared = s.shared().clone();
    let fut = async move { shared.pipeline.call(cmd).await };
    ctx.spawn(fut.into_actor(s).map(move |res, s, _| {
        let err = match res {
            Ok(Outcome::Refused(r)) => Some(refusal(&r)),
            Ok(_) => None,
            Err(_) => Some(("wait", "internal-server-error", "storage cannot commit now")),
        };
        match err {
            Some((kind, cond, text)) => {
                let e = error_reply(&req, None, kind, cond, Some(text));
                s.send_el(&e);
            }
            None if req.name() == "iq" => {
                let r = build!("iq", ns::CLIENT, "type" => "result", "id" => attr!(req, "id").unwrap_or(""), "from" => attr!(req, "to").unwrap_or("")).build();
                s.send_el(&r);
            }
            None => {}
        }
    }));
}

/// A message to a room with a mediated invitation (XEP-0045 §7.8.2): `GroupAdd` of the invitees
/// by the inviter. Returns false when `el` holds no invitation.
pub fn invite(s: &mut XmppSession, el: &Element, ctx: &mut Context<XmppSession>) -> bool {
    let Some(x) = el.get_child("x", ns::MUC_USER) else { return false };
    let invitees: Vec<String> = x
        .children()
        .filter(|c| c.name() == "invite")
        .filter_map(|i| attr!(i, "to").and_then(|t| jid::Jid::new(t).ok()))
        .filter(|j| j.domain().as_str() == s.shared().cfg.xmpp.domain)
        .filter_map(|j| j.node().map(|n| n.as_str().to_owned()))
        .collect();
    if invitees.is_empty() {
        return false;
    }
    let Some(group) = room_group(s, attr!(el, "to")) else { return false };
    let cap = s.shared().cfg.limits_group_members();
    let cmd = Command::GroupAdd { group, by: s.user().to_owned(), users: invitees, cap };
    submit(s, el.clone(), cmd, ctx);
    true
}

/// The owner's room configuration (XEP-0045 §10.2): the fixed configuration of a parley group.
fn config_form(name: &str) -> Element {
    let field = |var: &str, typ: &str, value: &str| {
        build!("field", ns::DATA_FORMS, "var" => var, "type" => typ).append(text_el("value", ns::DATA_FORMS, value)).build()
    };
    Element::builder("x", ns::DATA_FORMS)
        .attr(rxml::xml_ncname!("type").into(), "form")
        .append(field("FORM_TYPE", "hidden", "http://jabber.org/protocol/muc#roomconfig"))
        .append(field("muc#roomconfig_roomname", "text-single", name))
        .append(field("muc#roomconfig_persistentroom", "boolean", "1"))
        .append(field("muc#roomconfig_membersonly", "boolean", "1"))
        .append(field("muc#roomconfig_whois", "list-single", "anyone"))
        .append(field("muc#roomconfig_publicroom", "boolean", "0"))
        .build()
}

/// Whether a submitted configuration field asks for something other than the fixed one.
fn differs(var: &str, value: &str, name: &str) -> bool {
    let truthy = matches!(value, "1" | "true");
    match var {
        "muc#roomconfig_roomname" => value != name,
        "muc#roomconfig_persistentroom" | "muc#roomconfig_membersonly" => !truthy,
        "muc#roomconfig_publicroom" => truthy,
        "muc#roomconfig_whois" => value != "anyone",
        _ => false,
    }
}

/// An iq to a room in the `muc#owner` or `muc#admin` namespace (XEP-0045 §9, §10); None when it
/// is not one this module answers.
pub fn iq(s: &mut XmppSession, iq: &Element, child: &Element, ctx: &mut Context<XmppSession>) -> Option<()> {
    let typ = attr!(iq, "type")?;
    let cns = child.ns();
    let Some(group) = room_group(s, attr!(iq, "to")) else { return None };
    let me = s.user().to_owned();
    let rec = s.shared().state().group(&group).ok().flatten().filter(|g| g.members.iter().any(|m| m.user == me));
    let Some(rec) = rec else {
        let e = error_reply(iq, None, "auth", "forbidden", Some("not a member of this room"));
        s.send_el(&e);
        return Some(());
    };
    let admin = rec.members.iter().any(|m| m.user == me && m.admin);
    let result = |payload: Option<Element>| {
        let mut b = build!("iq", ns::CLIENT, "type" => "result", "id" => attr!(iq, "id").unwrap_or(""), "from" => attr!(iq, "to").unwrap_or(""));
        if let Some(p) = payload {
            b = b.append(p);
        }
        b.build()
    };
    let reply = match (typ, cns.as_str()) {
        (_, NS_OWNER) if !admin => error_reply(iq, None, "auth", "forbidden", Some("only a group admin owns the room")),
        ("get", NS_OWNER) => result(Some(Element::builder("query", NS_OWNER).append(config_form(&rec.name)).build())),
        ("set", NS_OWNER) => {
            let Some(x) = child.get_child("x", ns::DATA_FORMS) else {
                let e = error_reply(iq, None, "cancel", "feature-not-implemented", Some("rooms are deleted by leaving the group"));
                s.send_el(&e);
                return Some(());
            };
            let bad = x.children().filter(|f| f.name() == "field").any(|f| {
                let v = f.get_child("value", ns::DATA_FORMS).map(|v| v.text()).unwrap_or_default();
                differs(attr!(f, "var").unwrap_or(""), v.trim(), &rec.name)
            });
            if bad && attr!(x, "type") == Some("submit") {
                error_reply(iq, None, "modify", "not-acceptable", Some("a parley group is members-only, persistent, non-anonymous, and keeps its name"))
            } else {
                result(None)
            }
        }
        ("get", NS_ADMIN) => {
            // §9.5, §10.5: the member or owner list.
            let want = child.get_child("item", NS_ADMIN).and_then(|i| attr!(i, "affiliation")).unwrap_or("member").to_owned();
            let items = rec.members.iter().filter(|m| match want.as_str() {
                "owner" => m.admin,
                "member" => !m.admin,
                _ => false,
            });
            let items = items.map(|m| {
                build!("item", NS_ADMIN, "affiliation" => want.as_str(), "jid" => s.bare_of(&m.user), "nick" => m.user.as_str()).build()
            });
            result(Some(Element::builder("query", NS_ADMIN).append_all(items.collect::<Vec<_>>()).build()))
        }
        ("set", NS_ADMIN) => {
            let Some(item) = child.get_child("item", NS_ADMIN) else {
                let e = error_reply(iq, None, "modify", "bad-request", Some("an item is needed"));
                s.send_el(&e);
                return Some(());
            };
            let user = attr!(item, "jid")
                .and_then(|j| jid::Jid::new(j).ok())
                .and_then(|j| j.node().map(|n| n.as_str().to_owned()))
                .or_else(|| attr!(item, "nick").map(str::to_owned));
            let (Some(user), Some(aff)) = (user, attr!(item, "affiliation")) else {
                let e = error_reply(iq, None, "cancel", "feature-not-implemented", Some("only affiliations (member, none, outcast) can be changed"));
                s.send_el(&e);
                return Some(());
            };
            let cmd = match aff {
                "none" if user == me => Command::GroupLeave { group, by: me },
                "member" => Command::GroupAdd { group, by: me, users: vec![user], cap: s.shared().cfg.limits_group_members() },
                "none" | "outcast" => Command::GroupRemove { group, by: me, users: vec![user] },
                _ => {
                    let e = error_reply(iq, None, "cancel", "not-allowed", Some("parley groups have no promotion to admin or owner"));
                    s.send_el(&e);
                    return Some(());
                }
            };
            submit(s, iq.clone(), cmd, ctx);
            return Some(());
        }
        _ => return None,
    };
    s.send_el(&reply);
    Some(())
}
