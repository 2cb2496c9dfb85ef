"""Run the real CLI with a pseudo-terminal as its stdin, stdout and stderr, as a person at a shell would."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

from tests.helpers import ROOT


def run_in_terminal(*args: str, timeout: float = 300) -> tuple[int, str]:
    """`python -m hpcprune ARGS` attached to a 40x160 pseudo-terminal; returns (exit status, everything it wrote)."""
    primary, secondary = pty.openpty()
    # tqdm sizes its bar to the terminal: a terminal of 0 columns would show no bar at all.
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    process = subprocess.Popen([sys.executable, "-m", "hpcprune", *args], stdin=secondary, stdout=secondary,
                               stderr=secondary, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, close_fds=True)
    os.close(secondary)
    output = bytearray()
    try:
        while True:
            try:
                data = os.read(primary, 1 << 16)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            output += data
        status = process.wait(timeout=timeout)
    finally:
        os.close(primary)
        if process.poll() is None:
            process.kill()
    return status, output.decode(errors="replace")
