"""Tiny network probes run inside lab hosts (tests/lab/test_field_profiles.py).

    netprobe.py recv PORT SECONDS N [GROUP] count UDP datagrams for SECONDS or until N came (joining
                                            multicast GROUP), print the count
    netprobe.py send HOST PORT N            send N numbered UDP datagrams, 2 ms apart
    netprobe.py listen PORT SECONDS         accept TCP connections for SECONDS
    netprobe.py connect HOST PORT           print "ok" if a TCP connection opens within 3 s, else "fail"
    netprobe.py all PORT SECONDS HOST...    bind PORT, print "ready", wait for a line on stdin, send a
                                            datagram to PORT of every HOST (3 rounds), print how many
                                            of the HOSTs were heard from within SECONDS
"""

from __future__ import annotations

import socket
import struct
import sys
import time


def main(argv: list[str]) -> None:
    cmd = argv[0]
    if cmd == "recv":
        port, seconds = int(argv[1]), float(argv[2])
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", port))
        want = int(argv[3])
        if len(argv) > 4:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                         struct.pack("4s4s", socket.inet_aton(argv[4]), socket.inet_aton("0.0.0.0")))
        print("ready", flush=True)
        deadline, seen = time.monotonic() + seconds, set()
        while (left := deadline - time.monotonic()) > 0 and len(seen) < want:
            s.settimeout(left)
            try:
                seen.add(s.recv(64))
            except socket.timeout:
                break
        print(len(seen), flush=True)
    elif cmd == "send":
        host, port, n = argv[1], int(argv[2]), int(argv[3])
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        for k in range(n):
            try:
                s.sendto(str(k).encode(), (host, port))
            except OSError:
                pass  # an output drop rule answers EPERM: that datagram is lost
            time.sleep(0.002)
    elif cmd == "listen":
        port, seconds = int(argv[1]), float(argv[2])
        s = socket.create_server(("", port))
        print("ready", flush=True)
        s.settimeout(seconds)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                s.accept()[0].close()
            except socket.timeout:
                break
    elif cmd == "all":
        port, seconds, hosts = int(argv[1]), float(argv[2]), argv[3:]
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("", port))
        print("ready", flush=True)
        sys.stdin.readline()
        deadline, heard = time.monotonic() + seconds, set()
        for _ in range(3):
            for host in hosts:
                try:
                    s.sendto(b"hi", (host, port))
                except OSError:
                    pass  # no neighbour entry could be made: that datagram is lost
            time.sleep(0.2)
        while (left := deadline - time.monotonic()) > 0 and len(heard) < len(hosts):
            s.settimeout(left)
            try:
                heard.add(s.recvfrom(64)[1][0])
            except socket.timeout:
                break
        print(len(heard), flush=True)
    elif cmd == "connect":
        try:
            socket.create_connection((argv[1], int(argv[2])), timeout=3).close()
            print("ok")
        except OSError:
            print("fail")


if __name__ == "__main__":
    main(sys.argv[1:])
