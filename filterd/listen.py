"""Where a server of filterd's listens, checked one way for all of them (the SMTP proxy,
the milter, the spamd protocol, metrics): loopback unless `allow_remote` says otherwise,
or a Unix socket with a chosen mode and group, and only the clients `allowed_clients`
names. The MTA and the mail tools run on this machine; a filter others can reach scores
their mail, learns from their labels, or (the proxy) relays for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import ipaddress
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, Field, ValidationInfo, field_validator

log = logging.getLogger("filterd")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
ClientHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


LINGER_BYTES = 1 << 20  # unread client bytes dropped after the last answer, at most


def is_loopback(host: str) -> bool:
    """Whether a listening address reaches this machine only: a loopback IP or localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


class TcpListening(BaseModel):
    """A TCP address and the clients it serves. Mixed into a source's options or a config
    section, which overrides `port` with its own default and may say in `exposed` what
    listening beyond loopback risks."""

    exposed: ClassVar[str] = "firewall it"

    # Listening beyond loopback must be asked for. (Before `host`: its check reads it.)
    allow_remote: bool = False
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)  # 0: any free port (tests)
    # TCP clients served; others are closed at connect, with a log line.
    allowed_clients: list[Network] = Field(
        default_factory=lambda: [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1")]
    )

    @field_validator("host")
    @classmethod
    def _listen_where_meant(cls, host: str, info: ValidationInfo) -> str:
        """An empty host would listen on every address without a word; any other address
        beyond loopback needs allow_remote."""
        if not host.strip():
            raise ValueError("empty: that listens on every address; name one, e.g. 127.0.0.1")
        if not info.data.get("allow_remote") and not is_loopback(host):
            raise ValueError(
                f"{host} is not a loopback address: set allow_remote: true to listen there "
                f"({cls.exposed})"
            )
        return host

    def where(self) -> str:
        """For log lines: host:port."""
        return f"{self.host}:{self.port}"

    def permits(self, connection: asyncio.StreamWriter | asyncio.BaseTransport) -> bool:
        """Whether this client may talk to us: its address is in allowed_clients."""
        peer = connection.get_extra_info("peername")
        if not isinstance(peer, tuple):  # a Unix socket: its mode decided
            return True
        try:
            address = ipaddress.ip_address(peer[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.allowed_clients)


class Listening(TcpListening):
    """A TCP address or, when `socket` is set, a Unix socket instead (the MTA's chroot may
    need it under its spool)."""

    socket: Path | None = None
    socket_mode: str = Field("0660", pattern=r"^0?[0-7]{3}$")
    socket_group: str | None = None  # the group that may connect (e.g. postfix)

    @field_validator("socket_group")
    @classmethod
    def _group_exists(cls, group: str | None) -> str | None:
        if group is not None:
            try:
                grp.getgrnam(group)
            except KeyError:
                raise ValueError(f"no group {group!r} on this machine") from None
        return group

    def where(self) -> str:
        """For log lines: unix:/path or host:port."""
        return f"unix:{self.socket}" if self.socket else super().where()


def prepare_socket(path: Path) -> None:
    """Remove a stale socket left by a daemon that did not stop cleanly. One that still
    answers is another process's (a second `filterd serve`): taking it over would cut the
    running daemon off its clients, so that is an error, as is anything not a socket."""
    if path.is_socket():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(str(path))
            except OSError:  # nobody listens: stale
                path.unlink()
                return
        raise OSError(errno.EADDRINUSE, f"{path} is in use by another process; not taking it over")
    if path.exists():
        raise OSError(f"{path}: exists and is not a socket; not replacing it")


def socket_identity(path: Path) -> tuple[Path, int]:
    """What remove_socket needs to remove only the socket we made."""
    return path, path.stat().st_ino


def remove_socket(identity: tuple[Path, int]) -> None:
    """Remove our socket at stop, unless it is gone or another process's by now."""
    path, inode = identity
    with contextlib.suppress(OSError):
        if path.is_socket() and path.stat().st_ino == inode:
            path.unlink()


def secure_socket(path: Path, mode: str, group: str | None = None) -> None:
    """Give a new Unix socket its configured mode and group."""
    if group is not None:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    os.chmod(path, int(mode, 8))


async def serve(
    listening: TcpListening, handle: ClientHandler, name: str, limit: int = 2**16
) -> asyncio.Server:
    """Listen where `listening` says; clients it does not permit are closed at once."""

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not listening.permits(writer):
            log.warning(
                "source=%s refused a client from %s: not in allowed_clients",
                name,
                writer.get_extra_info("peername"),
            )
            writer.close()
            return
        await handle(reader, writer)

    if isinstance(listening, Listening) and listening.socket is not None:
        path = listening.socket.expanduser()
        prepare_socket(path)
        server = await asyncio.start_unix_server(guarded, path, limit=limit)
        secure_socket(path, listening.socket_mode, listening.socket_group)
        return server
    server = await asyncio.start_server(guarded, listening.host, listening.port, limit=limit)
    exposed = [s.getsockname()[0] for s in server.sockets if not is_loopback(s.getsockname()[0])]
    if exposed:
        log.warning(
            "source=%s listening beyond loopback on %s (allow_remote): firewall it",
            name,
            ", ".join(exposed),
        )
        if all(network.is_loopback for network in listening.allowed_clients):
            log.warning(
                "source=%s allowed_clients admits loopback only: remote clients will be "
                "refused until it lists their networks",
                name,
            )
    return server


async def linger(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seconds: float
) -> None:
    """After the last answer: end our side, then read and drop what the client still sends
    (at most LINGER_BYTES, for at most `seconds`). Closing with its bytes unread would reset
    the connection, and the client could lose the answer."""
    if writer.can_write_eof():
        writer.write_eof()
    left = LINGER_BYTES
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while left > 0 and (data := await reader.read(min(left, 1 << 16))):
                left -= len(data)


def bound_port(server: asyncio.Server) -> int:
    """The TCP port a server listens on (the system's choice for port 0); 0 for a socket."""
    name = server.sockets[0].getsockname()
    return name[1] if isinstance(name, tuple) else 0
