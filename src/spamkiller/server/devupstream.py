"""The built-in development upstream: a local SMTP server that stores every message in a Maildir.

It lets a newcomer run Spam Killer with no mail server behind it and watch mail arrive in
`data_dir/maildir/new`. It speaks through the same sans-IO `ServerSession` as the MX, accepts any
recipient, and answers 250 only after the file is written and fsynced (it is the final hop here).
It listens on loopback by default and is not meant for production.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
from pathlib import Path

from spamkiller.smtp.events import ConnectionClosed, MailFrom, MessageReceived, NeedData
from spamkiller.smtp.limits import Limits
from spamkiller.smtp.replies import Reply
from spamkiller.smtp.server import ServerSession
from spamkiller.smtp.states import State

_counter = itertools.count()


def deliver(maildir: Path, sender: str, content: bytes) -> str:
    """Write one message into `maildir` the Maildir way (tmp, fsync, rename to new); its name."""
    name = f"{time.time_ns()}.P{os.getpid()}Q{next(_counter)}.{socket.gethostname()}"
    tmp = maildir / "tmp" / name
    with open(tmp, "wb") as f:
        f.write(f"Return-Path: <{sender}>\r\n".encode())
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, maildir / "new" / name)
    return name


def ensure_maildir(maildir: Path) -> None:
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)


class DevUpstream:
    """A tiny final-delivery SMTP server for development and the quick start."""

    def __init__(self, maildir: Path, *, hostname: str = "dev-upstream.localhost") -> None:
        self.maildir = maildir
        self.hostname = hostname
        self.limits = Limits(max_message_size=2**31 - 1)
        self._server: asyncio.Server | None = None

    async def start(self, address: str, port: int) -> None:
        ensure_maildir(self.maildir)
        self._server = await asyncio.start_server(self._serve, address, port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = ServerSession(hostname=self.hostname, session_id="DEV", limits=self.limits)
        writer.write(session.greeting())
        sender = ""
        loop = asyncio.get_running_loop()
        try:
            while session.state is not State.CLOSED:
                event = session.next_event()
                if isinstance(event, NeedData):
                    session.receive_data(await reader.read(65536))
                    continue
                if isinstance(event, ConnectionClosed):
                    break
                reply = event.reply
                if isinstance(event, MailFrom):
                    sender = str(event.sender or "")
                elif isinstance(event, MessageReceived):
                    content = event.data.content()
                    name = await loop.run_in_executor(None, deliver, self.maildir, sender, content)
                    reply = Reply(250, "2.0.0", f"Ok: queued as {name.split('.')[0]}")
                writer.write(session.send(reply))
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
