"""Memory per idle XMPP session (BENCHMARKS.md): opens N authenticated, bound, available XMPP TCP
streams against a running parley and reads the server's RSS from /proc before and after.

Usage: idle_cost.py XMPP_HOST XMPP_PORT HTTP_URL SERVER_PID [N]
Only stdlib; loopback only; every wait bounded.
"""
import asyncio
import base64
import hashlib
import hmac
import os
import json
import sys
import time
import urllib.request

PASSWORD = "correct horse battery"
HEADER = ("<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
          "xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>")


def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024


async def until(r, needle, buf):
    while needle not in buf[0]:
        d = await asyncio.wait_for(r.read(65536), 20)
        if not d:
            raise RuntimeError("closed after: " + buf[0][-300:])
        buf[0] += d.decode()


async def session(host, port, user, resource="idle"):
    r, w = await asyncio.open_connection(host, port)
    buf = [""]
    w.write(HEADER.encode())
    await until(r, "</features>", buf)
    # SCRAM-SHA-256 (RFC 7677), so no argon2 runs while sessions are measured.
    nonce = os.urandom(18).hex()
    first_bare = f"n={user},r={nonce}"
    w.write(("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'>"
             + base64.b64encode(("n,," + first_bare).encode()).decode() + "</auth>").encode())
    await until(r, "</challenge>", buf)
    ch = buf[0].split("<challenge xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>")[1].split("</challenge>")[0]
    server_first = base64.b64decode(ch).decode()
    f = dict(kv.split("=", 1) for kv in server_first.split(","))
    salted = hashlib.pbkdf2_hmac("sha256", PASSWORD.encode(), base64.b64decode(f["s"]), int(f["i"]))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored = hashlib.sha256(client_key).digest()
    final_wo = "c=biws,r=" + f["r"]
    auth_msg = ",".join([first_bare, server_first, final_wo]).encode()
    sig = hmac.new(stored, auth_msg, "sha256").digest()
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, sig))).decode()
    buf[0] = ""
    w.write(("<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
             + base64.b64encode((final_wo + ",p=" + proof).encode()).decode() + "</response>").encode())
    await until(r, "<success", buf)
    buf[0] = ""
    w.write(HEADER.encode())
    await until(r, "</features>", buf)
    w.write(b"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>" + resource.encode() + b"</resource></bind></iq>")
    await until(r, "</jid>", buf)
    w.write(b"<presence/>")
    await until(r, "<presence", buf)
    return r, w


async def main():
    host, port, url, pid = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    n = int(sys.argv[5]) if len(sys.argv) > 5 else 2000
    for i in range(n):
        req = urllib.request.Request(url + "/v1/register", data=json.dumps({"user": f"idle{i}", "password": PASSWORD}).encode(), method="POST")
        try:
            urllib.request.urlopen(req, timeout=20).read()
        except urllib.error.HTTPError as e:
            assert e.code == 409, e.code
    async def open_all(resource):
        conns = []
        for i in range(0, n, 100):
            conns += await asyncio.gather(*[session(host, port, f"idle{j}", resource) for j in range(i, min(n, i + 100))])
        return conns

    # A first round of N sessions, kept open, pays what is paid once (the blocking pool's
    # threads and allocator arenas from the logins, sled's cache); the RSS growth from N more
    # idle sessions (same users, another resource) is what sessions cost, with no freed memory
    # to reuse.
    first = await open_all("warm")
    await asyncio.sleep(3)
    before = rss(pid)
    conns = await open_all("idle")
    await asyncio.sleep(2)
    after = rss(pid)
    per = (after - before) / n
    print(json.dumps({"sessions": n, "rss_before": before, "rss_after": after, "bytes_per_session": round(per)}))
    for r, w in conns + first:
        w.close()


asyncio.run(main())
