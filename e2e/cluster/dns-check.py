"""Asks the cluster DNS (through its Service address, so kube-proxy's rules are exercised too) for one name and
checks the answer: `dns-check.py SERVER NAME EXPECTED_IPV4`. Retries for up to 60 s (CoreDNS syncs with the API
server after it reports ready), then fails with what it got."""
import random
import socket
import struct
import sys
import time

server, name, expected = sys.argv[1], sys.argv[2], sys.argv[3]


def query(qname: str) -> list[str]:
    qid = random.randrange(65536)
    header = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    question = b"".join(bytes([len(p)]) + p.encode() for p in qname.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(header + question, (server, 53))
        reply, _ = s.recvfrom(4096)
    rid, flags, _qd, ancount, _ns, _ar = struct.unpack(">HHHHHH", reply[:12])
    if rid != qid or flags & 0x000F:
        return []
    pos = 12 + len(question)
    addresses = []
    for _ in range(ancount):
        if reply[pos] & 0xC0 == 0xC0:
            pos += 2
        else:
            while reply[pos]:
                pos += reply[pos] + 1
            pos += 1
        rtype, _cls, _ttl, rdlength = struct.unpack(">HHIH", reply[pos:pos + 10])
        pos += 10
        if rtype == 1 and rdlength == 4:
            addresses.append(socket.inet_ntoa(reply[pos:pos + 4]))
        pos += rdlength
    return addresses


deadline = time.monotonic() + 60
last = "no answer"
while time.monotonic() < deadline:
    try:
        got = query(name)
        if expected in got:
            print(f"[cluster] DNS: {name} -> {', '.join(got)}")
            sys.exit(0)
        last = f"answer {got}"
    except OSError as e:
        last = str(e)
    time.sleep(0.5)
sys.exit(f"[cluster] DNS check failed: {name} via {server}: {last}")
