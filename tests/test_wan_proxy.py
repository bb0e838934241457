"""The link proxy delays, limits, stalls, resets and partitions as configured (loopback only, measured).

An echo server stands for the SuperLink; every figure is measured through the proxy with a wall clock,
with bounds wide enough for a loaded 2-core machine but tight enough that a proxy which did nothing
(or did the wrong thing) fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.wan.proxy import PRESETS, LinkProfile, ProxyThread, TokenBucket, build_parser, profile

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    """A TCP echo server on 127.0.0.1 (one thread per connection)."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve_one(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()
    server.close()


def connect(proxy: ProxyThread) -> socket.socket:
    host, port = proxy.address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def round_trip(sock: socket.socket, payload: bytes = b"ping") -> float:
    """Seconds for ``payload`` to go through the proxy to the echo server and back."""
    start = time.monotonic()
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        got += chunk
    assert got == payload
    return time.monotonic() - start


def test_lan_carries_bytes_unchanged_both_ways(echo: tuple[str, int]) -> None:
    payload = bytes(range(256)) * 2000  # 512 KB: many chunks, order must hold
    with ProxyThread(echo, PRESETS["lan"]) as proxy, connect(proxy) as sock:
        assert round_trip(sock, payload) < 2.0
        assert proxy.counters.bytes_up == proxy.counters.bytes_down == len(payload)


def test_latency_and_jitter_are_the_configured_round_trip(echo: tuple[str, int]) -> None:
    with ProxyThread(echo, LinkProfile(rtt_ms=100, jitter_ms=40), seed=1) as proxy, connect(proxy) as sock:
        rtts = [round_trip(sock) for _ in range(20)]
    # Each way: 50 ms ± 20 ms, so a round trip lies in 60..140 ms (plus the machine's own delay).
    assert min(rtts) >= 0.060
    assert statistics.median(rtts) == pytest.approx(0.100, abs=0.035)
    assert statistics.pstdev(rtts) > 0.005, "no jitter"
    with ProxyThread(echo, LinkProfile(rtt_ms=100)) as proxy, connect(proxy) as sock:
        fixed = [round_trip(sock) for _ in range(5)]
    assert min(fixed) >= 0.100 and statistics.median(fixed) < 0.135


def test_bandwidth_is_capped_per_direction(echo: tuple[str, int]) -> None:
    size = 1_000_000
    with ProxyThread(echo, LinkProfile(bandwidth_mbit=16)) as proxy, connect(proxy) as sock:
        seconds = round_trip(sock, b"x" * size)
    # 1 MB at 2 MB/s takes >= 0.5 s each way; the ways overlap (pipelined), so the echo takes >= 0.5 s.
    assert seconds >= 0.5
    assert seconds < 1.6, "much slower than the cap"


def test_token_bucket_is_shared_by_all_connections() -> None:
    bucket = TokenBucket(8.0)  # 1 MB/s
    assert bucket.reserve(0.0, 500_000) == pytest.approx(0.5)
    assert bucket.reserve(0.0, 500_000) == pytest.approx(1.0)  # queued behind the first
    assert bucket.reserve(5.0, 1_000) == pytest.approx(5.001)  # an idle link starts afresh
    assert TokenBucket(0.0).reserve(3.0, 10**9) == 3.0  # unlimited


def test_a_refusing_partition_resets_open_connections_and_refuses_new_ones_until_it_ends(echo: tuple[str, int]) -> None:
    with ProxyThread(echo, PRESETS["lan"]) as proxy:
        sock = connect(proxy)
        round_trip(sock)
        proxy.partition(1.5, "refuse")
        with pytest.raises(OSError):
            round_trip(sock)
            round_trip(sock)  # a reset may surface on the second call
        start = time.monotonic()
        refused = 0
        while True:
            try:
                with connect(proxy) as fresh:
                    round_trip(fresh)
                break
            except (OSError, AssertionError):
                refused += 1
                time.sleep(0.1)
        assert refused >= 5 and time.monotonic() - start >= 1.2
        assert proxy.counters.refused >= 5 and proxy.counters.resets >= 1


def test_a_blackhole_partition_holds_bytes_until_the_link_returns(echo: tuple[str, int]) -> None:
    with ProxyThread(echo, PRESETS["lan"]) as proxy, connect(proxy) as sock:
        round_trip(sock)
        proxy.partition(1.0, "blackhole")
        assert round_trip(sock) >= 0.9  # the connection survives; the echo arrives after the partition


def test_periodic_resets_and_stalls(echo: tuple[str, int]) -> None:
    with ProxyThread(echo, LinkProfile(reset_every_s=0.5)) as proxy, connect(proxy) as sock:
        round_trip(sock)
        time.sleep(0.8)  # the first reset comes 0.4..0.6 s after start
        with pytest.raises(OSError):
            round_trip(sock)
            round_trip(sock)
        assert proxy.counters.resets >= 1
    with ProxyThread(echo, LinkProfile(stall_every_s=0.3, stall_s=0.5)) as proxy, connect(proxy) as sock:
        time.sleep(0.4)  # inside the first stall (it starts 0.24..0.36 s in and lasts 0.5 s)
        assert round_trip(sock) >= 0.1
        assert proxy.counters.stalls >= 1
        assert round_trip(sock) < 0.1  # the stall is over; the next comes 0.24..0.36 s after its end


def test_profiles_are_validated_and_named() -> None:
    assert profile("vpn") == LinkProfile(rtt_ms=50, jitter_ms=10, bandwidth_mbit=20, reset_every_s=180)
    assert profile("bad", stall_s=5).stall_s == 5
    with pytest.raises(ValueError, match="rtt"):
        profile("lan", rtt_ms=-1)
    with pytest.raises(ValueError, match="preset 'wan'"):
        profile("wan")
    args = build_parser().parse_args(
        ["--listen", "127.0.0.1:1", "--upstream", "h:2", "--rtt-ms", "80", "--partition", "10:20"]
    )
    assert (args.rtt_ms, args.upstream, args.partition) == (80.0, ("h", 2), [(10.0, 20.0)])


def test_the_command_carries_a_connection_and_reports_its_totals_on_sigterm(echo: tuple[str, int]) -> None:
    """``python -m deploy.wan.proxy`` as a container runs it: SIGTERM (``docker stop``) ends it with its totals."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # a free port for the proxy to listen on
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deploy.wan.proxy",
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            f"{echo[0]}:{echo[1]}",
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                break
            except ConnectionRefusedError:
                assert proc.poll() is None and time.monotonic() < deadline, "the proxy did not start listening"
                time.sleep(0.1)
        with sock:
            sock.sendall(b"x" * 1000)
            got = b""
            while len(got) < 1000:
                got += sock.recv(65536)
        proc.send_signal(signal.SIGTERM)
        _, log = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, log
    assert re.search(
        r"link proxy stopped: 1 connection\(s\), 0 refused, 0 reset, 0 stall\(s\); 1000 B up .*, 1000 B down", log
    ), log


# Run inside a network namespace of its own (``unshare --net``, as a container has one): a server that takes
# SIZE bytes and then answers SIZE bytes, the proxy command in front of it with the kernel capping the link,
# and a client that times the upload (until the first answer byte) and the download. Prints one JSON line.
_IN_NAMESPACE = r"""
import json, socket, subprocess, sys, threading, time
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
SIZE, MBIT = int(sys.argv[1]), sys.argv[2]
server = socket.create_server(("127.0.0.1", 9500))

def serve():
    conn, _ = server.accept()
    got = 0
    while got < SIZE:
        got += len(conn.recv(65536))
    conn.sendall(b"d" * SIZE)
    conn.close()

threading.Thread(target=serve, daemon=True).start()
proxy = subprocess.Popen(
    [sys.executable, "-m", "deploy.wan.proxy", "--listen", "127.0.0.1:9443", "--upstream", "127.0.0.1:9500",
     "--bandwidth-mbit", MBIT, "--shaping", "kernel", "--user", "nobody"],
    stderr=subprocess.PIPE, text=True,
)
deadline = time.monotonic() + 30
while True:
    try:
        sock = socket.create_connection(("127.0.0.1", 9443), timeout=30)
        break
    except ConnectionRefusedError:
        assert proxy.poll() is None and time.monotonic() < deadline, proxy.stderr.read()
        time.sleep(0.1)
started = time.monotonic()
sock.sendall(b"u" * SIZE)
got = len(sock.recv(65536))
first = time.monotonic()
while got < SIZE:
    got += len(sock.recv(65536))
done = time.monotonic()
classes = subprocess.run(["tc", "-s", "class", "show", "dev", "lo"], capture_output=True, text=True).stdout
proxy.terminate()
_, log = proxy.communicate(timeout=30)
print(json.dumps({"up_s": first - started, "down_s": done - first, "classes": classes, "log": log}))
"""


def _namespaces_and_tc() -> str | None:
    """Why the kernel-shaping test cannot run here, or None."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("tc") is None:
        return "needs root, unshare and tc (CI runs as root)"
    probe = subprocess.run(
        ["unshare", "--net", "tc", "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb"],
        capture_output=True,
        text=True,
        check=False,
    )
    return None if probe.returncode == 0 else f"this kernel has no HTB qdisc: {probe.stderr.strip()}"


def test_kernel_shaping_caps_both_directions_in_the_links_own_namespace() -> None:
    """``--shaping kernel``: tc caps upload and download at the preset's rate, the proxy's own bucket is off,
    and the proxy drops root once the kernel is set (as the compose WAN profile runs it)."""
    if (why := _namespaces_and_tc()) is not None:
        pytest.skip(why)
    size, mbit = 1_000_000, 8  # 1 MB at 1 MB/s: about 1 s each way
    done = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", _IN_NAMESPACE, str(size), str(mbit)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for way in ("up_s", "down_s"):
        assert 0.8 <= result[way] < 4.0, (way, result[way], result["log"])
    # The kernel carried the bytes in the link's two classes (each at least the payload), at the set rate.
    sent = {m[0]: int(m[1]) for m in re.findall(r"class htb (1:\d0) .*?\n Sent (\d+) bytes", result["classes"])}
    assert sent["1:10"] >= size and sent["1:20"] >= size, result["classes"]
    assert "class htb 1:10 root prio 0 rate 8Mbit ceil 8Mbit" in result["classes"]
    assert "bandwidth by the kernel (tc)" in result["log"] and "running as nobody" in result["log"], result["log"]


def test_kernel_shaping_refuses_clearly_without_the_right_to_set_it(echo: tuple[str, int]) -> None:
    """Not root (or no NET_ADMIN): the command names the tc call that failed and exits 2, carrying nothing."""
    if os.geteuid() == 0:
        prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    else:
        prefix = []
    done = subprocess.run(
        [
            *prefix,
            sys.executable,
            "-m",
            "deploy.wan.proxy",
            "--listen",
            "127.0.0.1:9444",
            "--upstream",
            f"{echo[0]}:{echo[1]}",
            "--bandwidth-mbit",
            "8",
            "--shaping",
            "kernel",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "--shaping kernel: `tc qdisc replace dev" in done.stderr, done.stderr
