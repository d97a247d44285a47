"""A packet capture of a testbed's links, and the TCP byte streams in it (to look for plaintext).

tcpdump (Debian package) writes the pcap; tcp_flows() reassembles each flow's payload so that a
test can search it for bytes it knows (an activation row, a header) whatever the segmenting.
"""
from __future__ import annotations

import re
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path


class Capture:
    """A tcpdump of the testbed's links; stop() returns the TCP payload bytes of each flow, reassembled."""

    def __init__(self, bed, path):
        self.bed, self.path = bed, Path(path)
        # -B: a 128 MiB kernel buffer; the default 2 MiB holds ~30 coalesced 64 KiB segments and
        # dropped 20-60 packets of a tp=2 generation even on an idle machine.
        self.proc = subprocess.Popen(["tcpdump", "-i", "any", "--immediate-mode", "-U", "-s", "0", "-B", "131072",
                                      "-w", str(self.path),
                                      "tcp and net", f"10.231.{bed.subnet}.0/24"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        bed._procs.append(self.proc)
        said = ""
        for _ in range(5):                          # "listening on ..." once it captures
            line = self.proc.stderr.readline().decode(errors="replace")
            said += line
            if "listening" in line or not line:
                break
        if "listening" not in said:
            raise RuntimeError(f"tcpdump did not start: {said}")

    def stop(self) -> dict:
        size, deadline = -1, time.monotonic() + 5
        while time.monotonic() < deadline:         # tcpdump drops what it has not read when it stops
            time.sleep(0.3)
            if self.path.stat().st_size == size:
                break
            size = self.path.stat().st_size
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(10)
        said = self.proc.stderr.read().decode(errors="replace")
        self.proc.stderr.close()
        dropped = re.search(r"(\d+) packets? dropped by kernel", said)
        self.dropped = int(dropped.group(1)) if dropped else None     # None: tcpdump did not say
        return tcp_flows(self.path.read_bytes())


# link type -> (bytes before the IP header, offset of the EtherType within them)
_LINK = {1: (14, 12), 113: (16, 14), 276: (20, 0)}     # Ethernet, Linux cooked v1, v2


def tcp_flows(pcap: bytes) -> dict:
    """{(src, sport, dst, dport): payload bytes in sequence order} of the IPv4 TCP in a pcap file.

    A packet seen on two interfaces (leaving one host, entering another) counts once."""
    order = ">" if pcap[:4] in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d") else "<"
    head, proto_at = _LINK[struct.unpack_from(order + "I", pcap, 20)[0]]
    segments, pos = {}, 24
    while pos + 16 <= len(pcap):
        _, _, incl, _ = struct.unpack_from(order + "IIII", pcap, pos)
        frame = pcap[pos + 16: pos + 16 + incl]
        pos += 16 + incl
        ip = frame[head:]
        if len(ip) < 20 or frame[proto_at:proto_at + 2] != b"\x08\x00" or ip[9] != 6:
            continue
        tcp = ip[(ip[0] & 0x0F) * 4:struct.unpack_from(">H", ip, 2)[0]]
        sport, dport, seq = struct.unpack_from(">HHI", tcp, 0)
        payload = tcp[(tcp[12] >> 4) * 4:]
        if payload:
            key = (socket.inet_ntoa(ip[12:16]), sport, socket.inet_ntoa(ip[16:20]), dport)
            flow = segments.setdefault(key, {})
            if len(payload) > len(flow.get(seq, b"")):        # twins may be cut differently (GRO)
                flow[seq] = payload
    return {k: _stitch(s) for k, s in segments.items()}


def _stitch(segments: dict) -> bytes:
    """The byte stream from {sequence number: payload}, overlaps counted once (no wrap-around)."""
    out, end = [], None
    for seq, payload in sorted(segments.items()):
        if end is not None and seq < end:
            payload = payload[end - seq:]
            seq = end
        if payload:
            out.append(payload)
            end = seq + len(payload)
    return b"".join(out)
