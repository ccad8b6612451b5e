"""slixmpp scenarios against a running parley (driven by tests/it/xmpp.rs).

Usage: slix.py SCENARIO XMPP_HOST XMPP_PORT HTTP_URL
Prints 'OK <scenario>' and exits 0 on success; any failure raises (exit 1) with the reason.
Every wait is bounded (asyncio.wait_for), so a scenario always ends.
"""
import asyncio
import json
import logging
import sys
import urllib.request

import slixmpp
from slixmpp.xmlstream import ET

DOMAIN = "localhost"
PASSWORD = "correct horse battery"
T = 15  # seconds per wait


def http(url, path, body, token=None):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST")
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=T) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


class Client(slixmpp.ClientXMPP):
    """A slixmpp client that records what it receives in queues."""

    def __init__(self, jid, password, mech=None, register=False, resume=False):
        super().__init__(jid, password, sasl_mech=mech)
        self.enable_plaintext = True
        self.enable_starttls = False
        self.enable_direct_tls = False
        self.plugin["feature_mechanisms"].unencrypted_plain = True
        self.plugin["feature_mechanisms"].unencrypted_scram = True
        for p in ["xep_0030", "xep_0199", "xep_0184", "xep_0333", "xep_0085", "xep_0280", "xep_0313", "xep_0359", "xep_0198", "xep_0045", "xep_0077"]:
            self.register_plugin(p)
        self.plugin["xep_0184"].auto_ack = False
        self.plugin["xep_0184"].auto_request = False
        self.plugin["xep_0198"].allow_resume = resume
        self.messages = asyncio.Queue()
        self.receipts = asyncio.Queue()
        self.markers = asyncio.Queue()
        self.states = asyncio.Queue()
        self.carbons = asyncio.Queue()
        self.started = asyncio.Event()
        self.failed = asyncio.Event()
        self.add_event_handler("session_start", self._start)
        self.add_event_handler("failed_auth", lambda *_: self.failed.set())
        self.add_event_handler("message", self._message)
        self.add_event_handler("receipt_received", lambda m: self.receipts.put_nowait(m["receipt"]))
        self.add_event_handler("marker_displayed", lambda m: self.markers.put_nowait(m["displayed"]["id"]))
        for s in ["composing", "paused"]:
            self.add_event_handler("chatstate_" + s, lambda m, s=s: self.states.put_nowait(s))
        self.add_event_handler("carbon_sent", lambda m: self.carbons.put_nowait(m["carbon_sent"]))
        self.add_event_handler("carbon_received", lambda m: self.carbons.put_nowait(m["carbon_received"]))
        if register:
            self.add_event_handler("register", self._register)

    async def _register(self, _):
        resp = self.Iq()
        resp["type"] = "set"
        resp["register"]["username"] = self.boundjid.user
        resp["register"]["password"] = self.password
        await resp.send(timeout=T)

    async def _start(self, _):
        self.send_presence()
        self.started.set()

    def _message(self, m):
        if m["type"] in ("chat", "normal", "groupchat") and m["body"]:
            self.messages.put_nowait(m)


async def online(host, port, jid, mech=None, register=False, resume=False):
    c = Client(jid, PASSWORD, mech=mech, register=register, resume=resume)
    c.connect(host, port)
    done, _ = await asyncio.wait(
        [asyncio.ensure_future(c.started.wait()), asyncio.ensure_future(c.failed.wait())],
        timeout=T, return_when=asyncio.FIRST_COMPLETED)
    if not c.started.is_set():
        raise SystemExit(f"{jid}: did not start (auth failed: {c.failed.is_set()})")
    return c


async def get(q, what):
    try:
        return await asyncio.wait_for(q.get(), T)
    except asyncio.TimeoutError:
        raise SystemExit(f"timed out waiting for {what}")


class Native:
    """A parley native client (JSON over /v1/ws, PROTOCOL.md) to chat with the XMPP side."""

    def __init__(self, url, user, device="web"):
        self.url, self.user, self.device = url, user, device
        self.stash = []

    async def open(self, register=True):
        import websockets
        if register:
            st, b = http(self.url, "/v1/register", {"user": self.user, "password": PASSWORD})
            assert st == 201, (st, b)
        st, b = http(self.url, "/v1/login", {"user": self.user, "password": PASSWORD, "device": self.device})
        assert st == 200, (st, b)
        self.ws = await websockets.connect(self.url.replace("http", "ws") + "/v1/ws")
        await self.ws.send(json.dumps({"type": "hello", "token": b["token"]}))
        await self.until(lambda f: f["type"] == "synced")
        return self

    async def send(self, frame):
        await self.ws.send(json.dumps(frame))

    async def until(self, pred, what="a frame"):
        for i, f in enumerate(self.stash):
            if pred(f):
                del self.stash[i]
                return f
        async def loop():
            while True:
                f = json.loads(await self.ws.recv())
                if pred(f):
                    return f
                self.stash.append(f)
        try:
            return await asyncio.wait_for(loop(), T)
        except asyncio.TimeoutError:
            raise SystemExit(f"{self.user}: timed out waiting for {what}; stash {self.stash}")

    async def event(self, kind, pred=lambda e: True):
        f = await self.until(lambda f: f["type"] == "event" and f["kind"] == kind and pred(f[kind]), kind)
        await self.send({"type": "received", "up_to": f["ev"]})
        return f[kind]


async def scenario_chat(host, port, url):
    alice = await Native(url, "alice").open()
    st, _ = http(url, "/v1/register", {"user": "bob", "password": PASSWORD})
    assert st == 201
    bob = await online(host, port, f"bob@{DOMAIN}/phone", mech="SCRAM-SHA-256")
    # native → XMPP, with a delivered receipt back (the device cursor) and a read (XEP-0333)
    await alice.send({"type": "send", "id": "m1", "to": "bob", "body": "Hi Bob! ¿Qué tal? 👋"})
    m = await get(bob.messages, "m1 at bob")
    assert m["body"] == "Hi Bob! ¿Qué tal? 👋" and m["id"] == "m1" and m["from"].bare == f"alice@{DOMAIN}", m
    assert m["stanza_id"]["id"] == "dm:alice:bob/1", m
    r = await alice.event("receipt", lambda r: r["status"] == "delivered")
    assert r["by"] == "bob" and r["up_to"] == 1, r
    bob.send_message(mto=f"alice@{DOMAIN}", mtype="chat", mbody=None)  # nothing: ignored
    st = bob.make_message(mto=f"alice@{DOMAIN}", mtype="chat")
    st["chat_state"] = "composing"
    st.send()
    t = await alice.until(lambda f: f["type"] == "typing", "typing")
    assert t["from"] == "bob" and t["state"] == "composing", t
    mk = bob.make_message(mto=f"alice@{DOMAIN}", mtype="chat")
    mk["displayed"]["id"] = "m1"
    mk.send()
    r = await alice.event("receipt", lambda r: r["status"] == "read")
    assert r["up_to"] == 1, r
    # XMPP → native, with receipts and markers back
    out = bob.make_message(mto=f"alice@{DOMAIN}", mtype="chat", mbody="Hola Alice — שלום")
    out["id"] = "b1"
    out["request_receipt"] = True
    out.send()
    e = await alice.event("message", lambda e: e["from"] == "bob")
    assert (e["id"], e["from"], e["body"], e["seq"]) == ("b1", "bob", "Hola Alice — שלום", 2), e
    rid = await get(bob.receipts, "delivered receipt at bob")
    assert rid == "b1", rid
    await alice.send({"type": "read", "conv": "dm:alice:bob", "seq": 2})
    did = await get(bob.markers, "displayed marker at bob")
    assert did == "b1", did
    await alice.send({"type": "typing", "conv": "dm:alice:bob", "state": "composing"})
    s = await get(bob.states, "composing at bob")
    assert s == "composing"
    # a resend of b1 is idempotent
    out.send()
    await alice.send({"type": "history", "conv": "dm:alice:bob", "rid": "h"})
    h = await alice.until(lambda f: f["type"] == "history", "history")
    assert [m["id"] for m in h["messages"]] == ["m1", "b1"], h
    # offline delivery: bob goes away, alice writes, bob comes back and gets them once, in order
    bob.disconnect()
    await asyncio.wait_for(bob.disconnected, T)
    for i in range(3):
        await alice.send({"type": "send", "id": f"off{i}", "to": "bob", "body": f"offline {i}"})
        await alice.until(lambda f: f["type"] == "ack" and f["id"] == f"off{i}", "ack")
    bob = await online(host, port, f"bob@{DOMAIN}/phone", mech="PLAIN")
    got = [(await get(bob.messages, "offline message"))["id"] for _ in range(3)]
    assert got == ["off0", "off1", "off2"], got
    await asyncio.sleep(0.3)
    assert bob.messages.empty(), "duplicates after the offline batch"
    # MAM: pages of 2, backwards, each in chronological order; together the whole history
    pages = []
    async for page in bob.plugin["xep_0313"].retrieve(with_jid=slixmpp.JID(f"alice@{DOMAIN}"), iterator=True, reverse=True, rsm={"max": 2}):
        ids = [r["mam_result"]["forwarded"]["stanza"]["id"] for r in page["mam"]["results"]]
        pages.append(ids)
    assert pages == [["off1", "off2"], ["b1", "off0"], ["m1"]], pages
    # carbons: a second resource sees what the first sends, and gets alice's messages once
    bob2 = await online(host, port, f"bob@{DOMAIN}/laptop", mech="SCRAM-SHA-1")
    # a new device starts from the beginning of the user's stream (as a native one does)
    backlog = [(await get(bob2.messages, "backlog"))["id"] for _ in range(4)]
    assert backlog == ["m1", "off0", "off1", "off2"], backlog
    await bob2.plugin["xep_0280"].enable()
    await bob.plugin["xep_0280"].enable()
    bob.send_message(mto=f"alice@{DOMAIN}", mtype="chat", mbody="from the phone")
    c = await get(bob2.carbons, "carbon at bob2")
    assert c["body"] == "from the phone", c
    e = await alice.event("message", lambda e: e["from"] == "bob")
    assert e["body"] == "from the phone"
    await alice.send({"type": "send", "id": "both", "to": "bob", "body": "to both"})
    for cl in (bob, bob2):
        m = await get(cl.messages, "to both")
        assert m["id"] == "both", (cl.boundjid, m)
    await asyncio.sleep(0.3)
    for cl in (bob, bob2):
        assert cl.messages.empty() and cl.carbons.empty(), "duplicate copies"
    bob.disconnect()
    bob2.disconnect()


async def scenario_login(host, port, url):
    # in-band registration (XEP-0077) and PLAIN
    a = await online(host, port, f"ibr1@{DOMAIN}/laptop", mech="PLAIN", register=True)
    a.disconnect()
    # registered over HTTP, SCRAM-SHA-256 then SCRAM-SHA-1 then PLAIN
    st, _ = http(url, "/v1/register", {"user": "scram1", "password": PASSWORD})
    assert st == 201, st
    for mech in ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"]:
        c = await online(host, port, f"scram1@{DOMAIN}/r1", mech=mech)
        c.disconnect()
    bad = Client(f"scram1@{DOMAIN}/r1", "wrong password!", mech="SCRAM-SHA-256")
    bad.connect(host, port)
    await asyncio.wait_for(bad.failed.wait(), T)
    bad.disconnect()


async def scenario_resume(host, port, url):
    alice = await Native(url, "alice").open()
    st, _ = http(url, "/v1/register", {"user": "bob", "password": PASSWORD})
    assert st == 201
    bob = await online(host, port, f"bob@{DOMAIN}/phone", resume=True)
    for _ in range(100):
        if bob.plugin["xep_0198"].sm_id:
            break
        await asyncio.sleep(0.05)
    assert bob.plugin["xep_0198"].sm_id, "stream management with resumption is enabled"
    await alice.send({"type": "send", "id": "r1", "to": "bob", "body": "before the cut"})
    assert (await get(bob.messages, "r1"))["id"] == "r1"
    # The cursor moves only when bob's ack (XEP-0198 <a/>) arrives: then alice sees delivered.
    r = await alice.event("receipt", lambda r: r["status"] == "delivered")
    assert r["up_to"] == 1, r
    # Cut the connection (no </stream>): the server parks the stream.
    resumed = asyncio.Event()
    bob.add_event_handler("session_resumed", lambda _: resumed.set())
    bob.transport.abort()
    await asyncio.wait_for(bob.disconnected, T)
    for i in (2, 3):
        await alice.send({"type": "send", "id": f"r{i}", "to": "bob", "body": f"while cut {i}"})
        await alice.until(lambda f: f["type"] == "ack" and f["id"] == f"r{i}", "ack")
    bob.connect(host, port)
    await asyncio.wait_for(resumed.wait(), T)
    got = [(await get(bob.messages, "replayed"))["id"] for _ in range(2)]
    assert got == ["r2", "r3"], got
    await asyncio.sleep(0.5)
    assert bob.messages.empty(), "nothing is duplicated"
    r = await alice.event("receipt", lambda r: r["status"] == "delivered" and r["up_to"] == 3)
    # A bound session that never resumes does not lose anything either: a plain login later gets
    # what was not acked (here: nothing more), and history holds each message once.
    await alice.send({"type": "history", "conv": "dm:alice:bob", "rid": "h"})
    h = await alice.until(lambda f: f["type"] == "history", "history")
    assert [m["id"] for m in h["messages"]] == ["r1", "r2", "r3"], h
    bob.disconnect()


async def scenario_muc(host, port, url):
    alice = await Native(url, "alice").open()
    for u in ("bob", "carol"):
        st, _ = http(url, "/v1/register", {"user": u, "password": PASSWORD})
        assert st == 201
    await alice.send({"type": "group_create", "name": "Team 🚀", "members": ["bob"], "rid": "g"})
    g = (await alice.until(lambda f: f["type"] == "result" and f.get("rid") == "g", "group"))["group"]
    room = g[2:] + "@conference." + DOMAIN
    bob = await online(host, port, f"bob@{DOMAIN}/phone")
    subject = asyncio.Event()
    bob.add_event_handler("groupchat_subject", lambda m: subject.set())
    await bob.plugin["xep_0045"].join_muc_wait(slixmpp.JID(room), "bob", maxstanzas=0, timeout=T)
    await alice.send({"type": "send", "id": "g1", "to": g, "body": "hello team"})
    m = await get(bob.messages, "group message")
    assert (m["type"], m["body"], str(m["from"])) == ("groupchat", "hello team", room + "/alice"), m
    out = bob.make_message(mto=room, mtype="groupchat", mbody="hi all")
    out["id"] = "gb1"
    out.send()
    e = await alice.event("message", lambda e: e["from"] == "bob")
    assert (e["conv"], e["id"], e["body"]) == (g, "gb1", "hi all"), e
    refl = await get(bob.messages, "reflection")
    assert (str(refl["from"]), refl["id"]) == (room + "/bob", "gb1"), refl
    # the room's archive
    iq = await bob.plugin["xep_0313"].retrieve(jid=slixmpp.JID(room), rsm={"max": 10}, timeout=T)
    ids = [r["mam_result"]["forwarded"]["stanza"]["id"] for r in iq["mam"]["results"]]
    assert ids == ["g1", "gb1"], ids
    # not a member: refused (members-only)
    carol = await online(host, port, f"carol@{DOMAIN}/x")
    try:
        await carol.plugin["xep_0045"].join_muc_wait(slixmpp.JID(room), "carol", maxstanzas=0, timeout=5)
        raise SystemExit("a non-member joined")
    except slixmpp.exceptions.PresenceError as err:
        assert err.condition == "registration-required", err.condition
    bob.disconnect()
    carol.disconnect()


async def scenario_muc_create(host, port, url):
    """XEP-0045: a room created by joining it (a parley group), configured as an instant room,
    a mediated invitation that makes the invitee a member, a message to the room received once
    by the invitee's XMPP and native clients, affiliation changes under the group admin rule,
    and leaving."""
    from slixmpp.plugins.xep_0004 import Form
    from slixmpp.exceptions import IqError, PresenceError
    for u in ("dan", "erin", "fay"):
        st, _ = http(url, "/v1/register", {"user": u, "password": PASSWORD})
        assert st == 201, st
    muc = lambda c: c.plugin["xep_0045"]
    room = slixmpp.JID("team1@conference." + DOMAIN)
    dan = await online(host, port, f"dan@{DOMAIN}/laptop")
    pres, _, _, _ = await muc(dan).join_muc_wait(room, "dan", maxstanzas=0, timeout=T)
    codes = pres["muc"]["status_codes"]
    assert 201 in codes and 110 in codes, codes
    assert pres["muc"]["affiliation"] == "owner", pres
    # the owner's configuration: members-only and persistent; an instant room is accepted,
    # a public room is not (a parley group is never public)
    form = await muc(dan).get_room_config(room, timeout=T)
    vals = form.get_values()
    assert vals["muc#roomconfig_membersonly"] and vals["muc#roomconfig_persistentroom"], vals
    await muc(dan).set_room_config(room, Form(), timeout=T)
    public = Form()
    public.add_field(var="muc#roomconfig_publicroom", ftype="boolean", value=True)
    try:
        await muc(dan).set_room_config(room, public, timeout=T)
        raise SystemExit("a public room was accepted")
    except IqError as e:
        assert e.condition == "not-acceptable", e.condition
    # erin: a native client and an XMPP client
    erin_native = await Native(url, "erin").open(register=False)
    erin = await online(host, port, f"erin@{DOMAIN}/phone")
    invited = asyncio.Queue()
    erin.add_event_handler("groupchat_invite", lambda m: invited.put_nowait(m))
    muc(dan).invite(room, f"erin@{DOMAIN}", "join us")
    inv = await get(invited, "the invitation at erin")
    assert inv["from"].bare == room.bare and inv["muc"]["invite"]["from"].bare == f"dan@{DOMAIN}", inv
    g = await erin_native.event("group", lambda g: g["action"] == "added")
    assert (g["group"], g["users"], g["by"]) == ("g:team1", ["erin"], "dan"), g
    members = await muc(dan).get_affiliation_list(room, "member", timeout=T)
    assert [slixmpp.JID(j).bare for j in members] == [f"erin@{DOMAIN}"], members
    await muc(erin).join_muc_wait(room, "erin", maxstanzas=0, timeout=T)
    out = dan.make_message(mto=room, mtype="groupchat", mbody="welcome, erin")
    out["id"] = "w1"
    out.send()
    m = await get(erin.messages, "the room message at erin")
    assert (m["type"], m["body"], str(m["from"]), m["id"]) == ("groupchat", "welcome, erin", str(room) + "/dan", "w1"), m
    e = await erin_native.event("message", lambda e: e["conv"] == "g:team1")
    assert (e["id"], e["from"], e["body"]) == ("w1", "dan", "welcome, erin"), e
    # the group admin rule: a member may not add anyone, nobody can be made owner
    try:
        await muc(erin).set_affiliation(room, "member", jid=f"fay@{DOMAIN}", timeout=T)
        raise SystemExit("a non-admin added a member")
    except IqError as e:
        assert e.condition == "forbidden", e.condition
    try:
        await muc(dan).set_affiliation(room, "owner", jid=f"erin@{DOMAIN}", timeout=T)
        raise SystemExit("a promotion was accepted")
    except IqError as e:
        assert e.condition == "not-allowed", e.condition
    # leaving the room (unavailable presence) keeps the membership; erin then leaves the group
    # (her own affiliation to none): a native `left` event, and she may not join again
    gone = asyncio.Queue()
    erin.add_event_handler("groupchat_presence", lambda p: p["type"] == "unavailable" and str(p["from"]) == f"{room}/erin" and gone.put_nowait(p))
    muc(erin).leave_muc(room, "erin")
    await get(gone, "the answer to erin's leave")
    await muc(erin).set_affiliation(room, "none", jid=f"erin@{DOMAIN}", timeout=T)
    g = await erin_native.event("group", lambda g: g["action"] == "left")
    assert g["users"] == ["erin"], g
    # The group event reaches erin's XMPP client as her own unavailable presence too; a join
    # sent before it arrives would take it for the join's answer.
    await get(gone, "erin's departure from the group at her XMPP client")
    try:
        await muc(erin).join_muc_wait(room, "erin", maxstanzas=0, timeout=5)
        raise SystemExit("a former member joined")
    except PresenceError as err:
        assert err.condition == "registration-required", err.condition
    # exactly once: nothing more came to erin's clients
    await asyncio.sleep(0.3)
    assert erin.messages.empty(), "a duplicate room message at erin"
    assert not [f for f in erin_native.stash if f.get("kind") == "message"], erin_native.stash
    for c in (dan, erin):
        c.disconnect()


async def scenario_mam_all(host, port, url):
    """XEP-0313 without `with`: every direct conversation of the user, in the global order
    (ts, conv, seq); RSM paging both ways (each page chronological); start/end; no carbons of
    results."""
    import datetime
    st, _ = http(url, "/v1/register", {"user": "alice", "password": PASSWORD})
    assert st == 201
    bob = await Native(url, "bob").open()
    carol = await Native(url, "carol").open()
    sent = []  # (id, ts)
    for sender, mid in [(bob, "b1"), (carol, "c1"), (bob, "b2"), (carol, "c2"), (bob, "b3")]:
        await sender.send({"type": "send", "id": mid, "to": "alice", "body": "text " + mid})
        a = await sender.until(lambda f: f["type"] == "ack" and f["id"] == mid, "ack " + mid)
        sent.append((mid, a["ts"]))
        # distinct milliseconds, so the expected order is the sending order
        for _ in range(100):
            if datetime.datetime.now().timestamp() * 1000 > a["ts"] + 1:
                break
            await asyncio.sleep(0.002)
    order = [m for m, _ in sent]
    alice = await online(host, port, f"alice@{DOMAIN}/phone")
    for _ in range(5):
        await get(alice.messages, "the backlog")
    other = await online(host, port, f"alice@{DOMAIN}/laptop")
    for _ in range(5):
        await get(other.messages, "the backlog at the second resource")
    await other.plugin["xep_0280"].enable()
    await alice.plugin["xep_0280"].enable()
    mam = alice.plugin["xep_0313"]
    ids = lambda page: [r["mam_result"]["forwarded"]["stanza"]["id"] for r in page["mam"]["results"]]
    iq = await mam.retrieve(rsm={"max": 10}, timeout=T)
    assert ids(iq) == order, ids(iq)
    assert iq["mam_fin"]["complete"], iq
    pages = [ids(p) async for p in mam.retrieve(iterator=True, reverse=True, rsm={"max": 2})]
    assert pages == [["c2", "b3"], ["c1", "b2"], ["b1"]], pages
    pages = [ids(p) async for p in mam.retrieve(iterator=True, rsm={"max": 2})]
    assert pages == [["b1", "c1"], ["b2", "c2"], ["b3"]], pages
    ts = dict(sent)
    at = lambda ms: datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc)
    iq = await mam.retrieve(start=at(ts["c1"]), end=at(ts["c2"]), rsm={"max": 10}, timeout=T)
    assert ids(iq) == ["c1", "b2", "c2"], ids(iq)
    # still per conversation with `with`
    iq = await mam.retrieve(with_jid=slixmpp.JID(f"carol@{DOMAIN}"), rsm={"max": 10}, timeout=T)
    assert ids(iq) == ["c1", "c2"], ids(iq)
    # results go to the querying resource only: no carbons, no messages at the other resource
    await asyncio.sleep(0.3)
    assert other.messages.empty() and other.carbons.empty(), "MAM results were copied"
    assert alice.messages.empty(), "MAM results came as messages"
    alice.disconnect()
    other.disconnect()


async def scenario_starttls(host, port, url):
    import ssl
    st, _ = http(url, "/v1/register", {"user": "tina", "password": PASSWORD})
    assert st == 201
    c = Client(f"tina@{DOMAIN}/tls", PASSWORD, mech="SCRAM-SHA-256")
    c.enable_starttls = True
    # The test's certificate is self-signed: trust it for this run only.
    c.ssl_context.check_hostname = False
    c.ssl_context.verify_mode = ssl.CERT_NONE
    secured = asyncio.Event()
    c.add_event_handler("ssl_cert", lambda _: secured.set())
    c.connect(host, port)
    await asyncio.wait_for(c.started.wait(), T)
    assert c.is_connected()
    await c.plugin["xep_0199"].ping(jid=slixmpp.JID(DOMAIN), timeout=T)
    assert c.transport.get_extra_info("ssl_object") is not None, "the stream runs over TLS"
    c.disconnect()


async def main():
    scenario, host, port, url = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    if "-v" in sys.argv:
        logging.basicConfig(level=logging.DEBUG)
    await globals()["scenario_" + scenario](host, port, url)
    print("OK", scenario)


asyncio.run(main())
