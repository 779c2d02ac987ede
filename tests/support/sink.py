"""postfix's smtp-sink as a real upstream, with its fault flags (-r 4xx, -f 5xx, -q disconnect)."""

from __future__ import annotations

import os
import shutil
import subprocess

from support.net import free_port, wait_port


class SmtpSink:
    """`with SmtpSink(["-f", "."]) as sink:` then relay to `sink.port`."""

    def __init__(self, flags: list[str] | None = None) -> None:
        binary = shutil.which("smtp-sink")
        if binary is None:
            raise RuntimeError("smtp-sink is not installed: run scripts/install-deps.sh")
        self.port = free_port()
        args = [binary, *(flags or [])]
        if os.geteuid() == 0:
            args += ["-u", "nobody"]  # smtp-sink refuses to keep root privileges
        args += [f"127.0.0.1:{self.port}", "100"]
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SmtpSink:
        self.proc = subprocess.Popen(
            self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_port(self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(5)
