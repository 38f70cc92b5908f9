#!/usr/bin/env python3
"""A minimal WebSocket client (standard library only) for the local stack:
subscribes to channels through the gateway and prints what arrives.

    scripts/ws.py --token "$(scripts/token.sh)" pricing.curves.EU-ETS.DEC26
    scripts/ws.py --url ws://127.0.0.1:10000/ws --count 3 'pricing.curves.CAISO.>'
"""
import argparse, base64, json, os, socket, struct, sys, urllib.parse

def frame(payload: bytes, opcode=1) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

def read_exact(s, n, buf):
    while len(buf) < n:
        chunk = s.recv(65536)
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return buf[:n], buf[n:]

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("channels", nargs="+")
    ap.add_argument("--url", default="ws://127.0.0.1:10000/ws")
    ap.add_argument("--token", default=os.environ.get("TOKEN", ""))
    ap.add_argument("--count", type=int, default=0, help="stop after this many messages (0: never)")
    a = ap.parse_args()
    u = urllib.parse.urlparse(a.url)
    path = u.path or "/"
    if a.token:
        path += "?" + urllib.parse.urlencode({"access_token": a.token})
    s = socket.create_connection((u.hostname, u.port or 80), timeout=30)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            sys.exit("closed during the handshake")
        buf += chunk
    head, buf = buf.split(b"\r\n\r\n", 1)
    status = head.split(b"\r\n")[0].decode()
    if " 101 " not in status + " ":
        sys.exit(f"refused: {status}\n{buf.decode(errors='replace')}")
    s.sendall(frame(json.dumps({"type": "subscribe", "id": 1, "channels": a.channels}).encode()))
    seen = 0
    while True:
        h, buf = read_exact(s, 2, buf)
        op, n = h[0] & 0x0F, h[1] & 0x7F
        if n == 126:
            ext, buf = read_exact(s, 2, buf); n = struct.unpack(">H", ext)[0]
        elif n == 127:
            ext, buf = read_exact(s, 8, buf); n = struct.unpack(">Q", ext)[0]
        payload, buf = read_exact(s, n, buf)
        if op == 9:
            s.sendall(frame(payload, 10)); continue
        if op == 8:
            code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
            sys.exit(f"closed by the server: {code} {payload[2:].decode(errors='replace')}")
        print(payload.decode(errors="replace"), flush=True)
        if json.loads(payload).get("type") == "message":
            seen += 1
            if a.count and seen >= a.count:
                return

if __name__ == "__main__":
    main()
