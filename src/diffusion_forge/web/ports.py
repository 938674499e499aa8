"""The server's address: checked before anything is built, so a taken port is one clear line (no Gradio here)."""
from __future__ import annotations

import errno
import socket

DEFAULT_HOST, DEFAULT_PORT, DEFAULT_QUEUE = "127.0.0.1", 7860, 32


def check_port(host: str, port: int) -> None:
    """A ValueError with one line when ``host:port`` cannot be bound (taken, or not an address here)."""
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"--port must lie in [0, 65535], got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r} is not an address of this machine ({e.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)      # as the server itself binds
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ValueError(f"port {port} on {host} is taken (another `dforge serve`?): stop it, or pick "
                                 "another with --port N (--port 0: any free port)") from None
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
