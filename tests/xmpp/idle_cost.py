"""Memory per idle XMPP session (BENCHMARKS.md): opens N authenticated, bound, available XMPP TCP
streams against a running parley and reads the server's RSS from /proc before and after.

Usage: idle_cost.py XMPP_HOST XMPP_PORT HTTP_URL SERVER_PID [N]
Only stdlib; loopback only; every wait bounded.
"""
import asyncio
import base64
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
            raise RuntimeError("closed")
        buf[0] += d.decode()


async def session(host, port, user):
    r, w = await asyncio.open_connection(host, port)
    buf = [""]
    w.write(HEADER.encode())
    await until(r, "</features>", buf)
    tok = base64.b64encode(f"\0{user}\0{PASSWORD}".encode()).decode()
    w.write(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{tok}</auth>".encode())
    await until(r, "<success", buf)
    buf[0] = ""
    w.write(HEADER.encode())
    await until(r, "</features>", buf)
    w.write(b"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>idle</resource></bind></iq>")
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
    time.sleep(1)
    before = rss(pid)
    conns = []
    for i in range(0, n, 100):
        conns += await asyncio.gather(*[session(host, port, f"idle{j}") for j in range(i, min(n, i + 100))])
    time.sleep(2)
    after = rss(pid)
    per = (after - before) / n
    print(json.dumps({"sessions": n, "rss_before": before, "rss_after": after, "bytes_per_session": round(per)}))
    for r, w in conns:
        w.close()


asyncio.run(main())
