"""Running multi-process (DDP, gloo) CLI runs from tests without port races.

Lightning picks the rendezvous port of a local multi-process run by binding port 0 and closing the socket
(``find_free_network_port``), then rank 0's TCP store binds it again a moment later. That port comes from the
kernel's ephemeral range, the same range every outgoing connection and every other concurrent test run on the machine
draws from, so now and then someone else holds it in between and the run dies at start (``EADDRINUSE`` / the store
cannot be reached). :func:`run_distributed` instead gives each run a port below the ephemeral range (which the kernel
never hands out on its own), checked free, and reruns a start that still lost a port race (at most ``attempts``
times; any other failure is returned as it is).
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

PORT_RACE_MARKERS = ("Address already in use", "EADDRINUSE", "address already in use")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(rng: random.Random | None = None) -> int:
    """A currently free TCP port in ``[20000, start of the ephemeral range)``."""
    rng = rng or random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "little"))
    high = max(_ephemeral_low(), 20001)
    for _ in range(200):
        port = rng.randrange(20000, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free TCP port found below the ephemeral range")


def run_distributed(cmd: Sequence[str], cwd: str | os.PathLike, env: dict[str, str], timeout: float = 600,
                    attempts: int = 3) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd)`` of a multi-process run on a fresh local rendezvous port; reruns lost port races."""
    proc = None
    for _ in range(attempts):
        run_env = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        proc = subprocess.run(list(cmd), cwd=cwd, env=run_env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0 or not any(m in proc.stdout + proc.stderr for m in PORT_RACE_MARKERS):
            return proc
    assert proc is not None
    return proc
