"""A fault-injecting TCP proxy: one site's wide-area link, put between its SuperNode and the front door.

Hospitals join over VPNs and WANs (20-200 ms round trips, a few Mbit/s, links that reset or drop for
minutes); a local deployment has none of that. This kernel has no ``sch_netem`` (``tc qdisc add ...
netem`` answers "Specified qdisc kind is unknown"), so latency, jitter, stalls, resets and partitions
are made here, in user space, per site; the bandwidth cap too, or by the kernel (``--shaping kernel``):

* latency: every chunk read from one side is delivered to the other ``rtt/2 ± jitter/2`` later
  (never before the chunk ahead of it: TCP does not reorder);
* bandwidth: each direction of the link (all its connections together) is a token bucket of
  ``bandwidth-mbit``: in this process, or with ``--shaping kernel`` in the kernel's traffic control
  (``tc``: an HTB class per direction, told apart by port, on every interface of the proxy's network
  namespace; the kernel paces packets, so TCP sees a real bottleneck: queueing, ACK clocking);
* resets: every ``reset-every-s`` (± 20 %) all open connections are reset (RST), as a VPN re-key or a
  NAT that forgets them does;
* stalls: after every ``stall-every-s`` (± 20 %) of service nothing moves for ``stall-s`` (a congested
  or flapping link);
* partitions, scripted: :meth:`FaultProxy.partition` for N seconds either refuses (RST) everything,
  or black-holes it (bytes are held, nothing is delivered, new connections are not carried on).

Run it as ``python -m deploy.wan.proxy --listen 127.0.0.1:9100 --upstream 127.0.0.1:9092 --preset vpn``,
or from Python (tests, benchmarks) as ``with ProxyThread(...) as proxy:``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pwd
import random
import shutil
import signal
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError

logger = logging.getLogger(__name__)

CHUNK = 16384  # bytes read at a time: at 5 Mbit/s one chunk is 26 ms of link time
QUEUED = 64  # chunks in flight per direction and connection (1 MiB): beyond it the sender is held back
PartitionMode = Literal["refuse", "blackhole"]
Shaping = Literal["proxy", "kernel"]


class LinkProfile(BaseModel):
    """How bad one site's link is. Zero switches a fault off."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    rtt_ms: float = Field(0.0, ge=0, alias="rtt-ms", description="round-trip latency the proxy adds")
    jitter_ms: float = Field(0.0, ge=0, alias="jitter-ms", description="± spread of that round trip")
    bandwidth_mbit: float = Field(0.0, ge=0, alias="bandwidth-mbit", description="per direction; 0 = unlimited")
    reset_every_s: float = Field(0.0, ge=0, alias="reset-every-s", description="reset all connections this often")
    stall_every_s: float = Field(0.0, ge=0, alias="stall-every-s", description="stall the link this often")
    stall_s: float = Field(0.0, ge=0, alias="stall-s", description="for this long")


#: The rehearsal presets of issue #30: a LAN, a hospital VPN, and a bad WAN link.
PRESETS: dict[str, LinkProfile] = {
    "lan": LinkProfile(),
    "vpn": LinkProfile(rtt_ms=50, jitter_ms=10, bandwidth_mbit=20, reset_every_s=180),
    "bad": LinkProfile(rtt_ms=200, jitter_ms=50, bandwidth_mbit=5, reset_every_s=120, stall_every_s=30, stall_s=3),
}


def profile(preset: str, **overrides: float) -> LinkProfile:
    """Preset ``preset`` with some fields replaced (keys as in the model, e.g. ``reset_every_s``)."""
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: choose one of {', '.join(PRESETS)}")
    try:
        return LinkProfile.model_validate({**PRESETS[preset].model_dump(), **overrides})
    except ValidationError as exc:
        raise ValueError(f"link profile {preset} with {overrides}: {exc}") from exc


class TokenBucket:
    """One direction of a link: chunks leave it no faster than ``bandwidth_mbit`` (shared by all connections)."""

    def __init__(self, bandwidth_mbit: float) -> None:
        self.bytes_per_s = bandwidth_mbit * 1e6 / 8
        self.free_at = 0.0  # loop time when the link has sent everything queued so far

    def reserve(self, now: float, size: int) -> float:
        """Loop time at which a chunk of ``size`` bytes ready at ``now`` has fully crossed the link."""
        if self.bytes_per_s <= 0:
            return now
        self.free_at = max(self.free_at, now) + size / self.bytes_per_s
        return self.free_at


@dataclass
class Counters:
    """What went through the proxy (read from another thread: plain ints, updated by the loop only)."""

    connections: int = 0
    refused: int = 0
    resets: int = 0
    stalls: int = 0
    bytes_up: int = 0  # site -> upstream
    bytes_down: int = 0


@dataclass(eq=False)
class _Pair:
    """One carried connection: the site's socket and the upstream's."""

    site: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def reset(self) -> None:
        for writer in (self.site, self.upstream):
            if writer is not None:
                _abort(writer)
        for task in self.tasks:
            task.cancel()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0), as a dropped link looks to the peer, not a polite FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class FaultProxy:
    """Carries TCP connections from ``listen`` to ``upstream`` through an emulated link (asyncio)."""

    def __init__(
        self,
        upstream: tuple[str, int],
        link: LinkProfile,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        seed: int = 0,
        shaping: Shaping = "proxy",
    ) -> None:
        """``shaping="kernel"``: the bandwidth cap is the kernel's (:func:`shape_in_kernel`), not this proxy's."""
        self.upstream, self.link, self.listen, self.shaping = upstream, link, listen, shaping
        self.random = random.Random(seed)
        self.counters = Counters()
        mbit = link.bandwidth_mbit if shaping == "proxy" else 0.0
        self.up, self.down = TokenBucket(mbit), TokenBucket(mbit)
        self.pairs: set[_Pair] = set()
        self.frozen_until = 0.0  # loop time: nothing is delivered before it (stalls, black-hole partitions)
        self.refusing_until = 0.0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._chores: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, *self.listen)
        self.port = self._server.sockets[0].getsockname()[1]
        if self.link.reset_every_s > 0:
            self._chores.append(asyncio.create_task(self._every(self.link.reset_every_s, self._reset_all)))
        if self.link.stall_every_s > 0 and self.link.stall_s > 0:
            self._chores.append(
                asyncio.create_task(self._every(self.link.stall_every_s, self._stall, self.link.stall_s))
            )
        logger.info(
            "link proxy %s:%d -> %s:%d (%s; bandwidth by the %s)",
            self.listen[0],
            self.port,
            *self.upstream,
            self.link,
            "kernel (tc)" if self.shaping == "kernel" else "proxy",
        )

    async def stop(self) -> None:
        for task in self._chores:
            task.cancel()
        if self._server is not None:
            self._server.close()
        for pair in list(self.pairs):
            pair.reset()
        self.pairs.clear()

    # faults ------------------------------------------------------------------------------------

    def partition(self, seconds: float, mode: PartitionMode = "refuse") -> None:
        """Cut the link for ``seconds`` (call in the loop; :class:`ProxyThread` does it from any thread).

        ``refuse``: open connections are reset and new ones reset at once. ``blackhole``: nothing is
        delivered either way and new connections are held, as when packets vanish; what was in flight
        arrives when the link returns (TCP retransmits), unless the ends have given up by then.
        """
        until = asyncio.get_running_loop().time() + seconds
        logger.warning("link to %s:%d partitioned (%s) for %g s", *self.upstream, mode, seconds)
        if mode == "refuse":
            self.refusing_until = max(self.refusing_until, until)
            self._reset_all()
        else:
            self.frozen_until = max(self.frozen_until, until)

    def _reset_all(self) -> None:
        self.counters.resets += len(self.pairs)
        for pair in list(self.pairs):
            pair.reset()
        self.pairs.clear()

    def _stall(self) -> None:
        self.counters.stalls += 1
        self.frozen_until = max(self.frozen_until, asyncio.get_running_loop().time() + self.link.stall_s)

    async def _every(self, period: float, action: Callable[[], None], lasting: float = 0.0) -> None:
        """``action`` after each ``period`` (± 20 %) of normal service; an action ``lasting`` a while ends first."""
        while True:
            await asyncio.sleep(period * self.random.uniform(0.8, 1.2))
            action()
            await asyncio.sleep(lasting)

    def _one_way_delay(self) -> float:
        half, spread = self.link.rtt_ms / 2000, self.link.jitter_ms / 2000
        return max(0.0, half + self.random.uniform(-spread, spread))

    async def _unfrozen(self) -> None:
        loop = asyncio.get_running_loop()
        while (wait := self.frozen_until - loop.time()) > 0:
            await asyncio.sleep(wait)

    # carrying ----------------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() < self.refusing_until:
            self.counters.refused += 1
            _abort(writer)
            return
        pair = _Pair(writer)
        self.pairs.add(pair)
        self.counters.connections += 1
        try:
            await self._unfrozen()
            await asyncio.sleep(self._one_way_delay())  # the SYN's trip
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except (OSError, asyncio.CancelledError):
            self.pairs.discard(pair)
            _abort(writer)
            return
        if pair not in self.pairs:  # reset while connecting
            _abort(up_writer)
            return
        pair.upstream = up_writer
        pair.tasks = [
            asyncio.create_task(self._pump(reader, up_writer, self.up, "bytes_up", pair)),
            asyncio.create_task(self._pump(up_reader, writer, self.down, "bytes_down", pair)),
        ]
        await asyncio.gather(*pair.tasks, return_exceptions=True)
        self.pairs.discard(pair)  # both directions closed (or the pair was reset)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, bucket: TokenBucket, counter: str, pair: _Pair
    ) -> None:
        """Read chunks from one end and deliver each after its delay and its turn on the link."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUED)
        deliver = asyncio.create_task(self._deliver(queue, writer, bucket, counter, pair))
        deliver.add_done_callback(lambda task: task.cancelled() or task.exception() is None or self._drop(pair))
        last = 0.0
        try:
            while chunk := await reader.read(CHUNK):
                last = max(last, loop.time() + self._one_way_delay())  # in order, like TCP
                await queue.put((last, chunk))
            await queue.put((last, b""))  # the peer's FIN, after everything it sent
            await deliver
        except (OSError, asyncio.CancelledError):
            deliver.cancel()
            self._drop(pair)

    def _drop(self, pair: _Pair) -> None:
        """One end failed or the link cut it: reset both ends (once)."""
        if pair in self.pairs:
            self.pairs.discard(pair)
            pair.reset()

    async def _deliver(
        self,
        queue: asyncio.Queue[tuple[float, bytes]],
        writer: asyncio.StreamWriter,
        bucket: TokenBucket,
        counter: str,
        pair: _Pair,
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, chunk = await queue.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            await self._unfrozen()
            if not chunk:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            await asyncio.sleep(max(0.0, bucket.reserve(loop.time(), len(chunk)) - loop.time()))
            await self._unfrozen()
            # Counted before the write: write() may hand the bytes to the socket at once, and a reader in
            # another thread that has them all must never see a smaller count (the LAN test did, once).
            setattr(self.counters, counter, getattr(self.counters, counter) + len(chunk))
            writer.write(chunk)
            await writer.drain()


class ProxyThread:
    """A :class:`FaultProxy` on its own event loop thread, for synchronous callers (tests, benchmarks)."""

    def __init__(
        self, upstream: tuple[str, int], link: LinkProfile, listen: tuple[str, int] = ("127.0.0.1", 0), seed: int = 0
    ) -> None:
        self.proxy = FaultProxy(upstream, link, listen, seed)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="link-proxy", daemon=True)

    @property
    def address(self) -> str:
        """``host:port`` the site connects to instead of the upstream."""
        return f"{self.proxy.listen[0]}:{self.proxy.port}"

    @property
    def counters(self) -> Counters:
        return self.proxy.counters

    def __enter__(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.proxy.start(), self.loop).result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    def partition(self, seconds: float, mode: PartitionMode = "refuse") -> None:
        """Cut the link for ``seconds`` from now (see :meth:`FaultProxy.partition`)."""

        async def cut() -> None:
            self.proxy.partition(seconds, mode)

        asyncio.run_coroutine_threadsafe(cut(), self.loop).result(timeout=10)


def netem_available() -> bool:
    """Whether this kernel has ``sch_netem``: tried on the loopback of a throwaway network namespace.

    Where it has, kernel-level delay/loss (``tc qdisc ... netem``) can stand in for the proxy's; on
    these machines it has not, and the proxy is the link.
    """
    tc, unshare = shutil.which("tc"), shutil.which("unshare")
    if tc is None or unshare is None:
        return False
    probe = subprocess.run(
        [unshare, "--net", tc, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
        capture_output=True,
        text=True,
        check=False,
    )
    return probe.returncode == 0


class ShapingError(RuntimeError):
    """The kernel refused the bandwidth cap (no ``tc``, no CAP_NET_ADMIN, no HTB in this kernel)."""


def shaping_commands(device: str, listen_port: int, upstream_port: int, mbit: float) -> list[list[str]]:
    """``tc`` commands that cap one interface's egress to ``mbit`` per direction of the proxied link.

    The proxy's network namespace carries both directions: packets *to* the upstream (destination port
    ``upstream_port``) are the site's upload, packets *from* the listening port are its download. Each
    gets an HTB class (a token bucket) of its own; everything else (DNS, other services) goes unshaped.
    """
    rate = f"{mbit:g}mbit"
    root = ["tc", "qdisc", "replace", "dev", device, "root", "handle", "1:", "htb", "default", "30"]
    commands = [root]
    for classid, this_rate, quantum in (("1:10", rate, "1514"), ("1:20", rate, "1514"), ("1:30", "10gbit", "60000")):
        commands.append(
            ["tc", "class", "add", "dev", device, "parent", "1:", "classid", classid, "htb"]
            + ["rate", this_rate, "ceil", this_rate, "quantum", quantum]
        )
    for first, protocol, match in ((1, "ip", "ip"), (3, "ipv6", "ip6")):  # a filter priority holds one protocol
        for prio, field_name, port, flow in (
            (first, "dport", upstream_port, "1:10"),
            (first + 1, "sport", listen_port, "1:20"),
        ):
            commands.append(
                ["tc", "filter", "add", "dev", device, "parent", "1:", "protocol", protocol, "prio", str(prio)]
                + ["u32", "match", match, field_name, str(port), "0xffff", "flowid", flow]
            )
    return commands


def shape_in_kernel(listen_port: int, upstream_port: int, mbit: float) -> list[str]:
    """Cap the link at ``mbit`` per direction on every interface of this network namespace; their names.

    Replaces each interface's root qdisc: run it only in a namespace of the link's own (its container),
    never on a host's interfaces. Needs ``tc`` and CAP_NET_ADMIN (root in the container).
    """
    if listen_port <= 0:
        raise ShapingError("--shaping kernel needs a fixed --listen port (the download class is told by it)")
    if shutil.which("tc") is None:
        raise ShapingError("--shaping kernel: `tc` (iproute2) is not installed")
    devices = sorted(name for _, name in socket.if_nameindex())  # this namespace's (not sysfs': the host's)
    for device in devices:
        for command in shaping_commands(device, listen_port, upstream_port, mbit):
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise ShapingError(f"--shaping kernel: `{' '.join(command)}` failed: {done.stderr.strip()}")
    logger.info(
        "kernel shaping: %g Mbit/s up (to port %d) and down (from port %d), HTB on %s",
        mbit,
        upstream_port,
        listen_port,
        ", ".join(devices),
    )
    return devices


def drop_privileges(user: str) -> None:
    """Run on as ``user`` once the kernel is configured: the proxy itself needs no root."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ShapingError(f"--user {user}: no such user") from None
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    logger.info("running as %s (uid %d)", user, entry.pw_uid)


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _partition(text: str) -> tuple[float, float]:
    at, _, seconds = text.partition(":")
    try:
        return float(at), float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--partition: expected AT:SECONDS, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy.wan.proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT the site connects to")
    parser.add_argument("--upstream", type=_address, required=True, help="HOST:PORT of the front door / SuperLink")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="lan")
    for name, info in LinkProfile.model_fields.items():
        parser.add_argument(f"--{info.alias}", dest=name, type=float, help=f"{info.description} (overrides the preset)")
    parser.add_argument(
        "--partition",
        type=_partition,
        action="append",
        default=[],
        metavar="AT:SECONDS",
        help="cut the link AT seconds after start for SECONDS (repeat)",
    )
    parser.add_argument("--partition-mode", choices=["refuse", "blackhole"], default="refuse")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shaping",
        choices=["proxy", "kernel"],
        default="proxy",
        help="who caps the bandwidth: this process (proxy), or the kernel's traffic control (kernel: `tc` HTB on "
        "every interface of this network namespace, so only in a container of the link's own; needs root)",
    )
    parser.add_argument("--user", help="with --shaping kernel as root: run on as this user once the kernel is set")
    return parser


async def _serve(args: argparse.Namespace, link: LinkProfile) -> Counters:
    """Carry connections until SIGTERM or SIGINT (``docker stop``, Ctrl-C); what went through, for the log."""
    proxy = FaultProxy(args.upstream, link, args.listen, args.seed, args.shaping)
    await proxy.start()
    loop = asyncio.get_running_loop()
    for at, seconds in args.partition:
        loop.call_later(at, proxy.partition, seconds, args.partition_mode)
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await proxy.stop()
    return proxy.counters


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    overrides = {k: v for k in LinkProfile.model_fields if (v := getattr(args, k)) is not None}
    try:
        link = profile(args.preset, **overrides)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    if netem_available():
        logger.info("this kernel has sch_netem; the proxy still emulates latency and faults in user space")
    try:
        if args.shaping == "kernel" and link.bandwidth_mbit > 0:
            shape_in_kernel(args.listen[1], args.upstream[1], link.bandwidth_mbit)
        if args.user:
            drop_privileges(args.user)
    except (ShapingError, OSError) as exc:
        logger.error("%s", exc)
        return 2
    counters = asyncio.run(_serve(args, link))
    # One line an operator (or tests/test_compose.py) reads to see that the site's traffic went this way.
    logger.info(
        "link proxy stopped: %d connection(s), %d refused, %d reset, %d stall(s); %d B up (site -> upstream), "
        "%d B down",
        counters.connections,
        counters.refused,
        counters.resets,
        counters.stalls,
        counters.bytes_up,
        counters.bytes_down,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
