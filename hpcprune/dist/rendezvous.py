"""Where the ranks of a torch.distributed world meet: a TCPStore on rank 0, on a port nobody else holds.

    mpirun -n 2 hpcprune prune ...      # the store's port travels over MPI
    srun --ntasks 4 hpcprune prune ...  # rank 0 announces it on the first free port of a job-derived list

A port that is found free and then released before use can be taken in between, and a port
computed from job ids can be held by anything. So rank 0 always opens the store on a port the
kernel picks (port 0) and keeps it open for the run. The others learn it in one of two ways:

- over the World they already have (mpirun: MPI), `store_over`;
- without one (srun, submitit), `store_by_announcement`: every rank derives the same list of
  candidate ports from the job id; rank 0 binds the first one it can (a port held by anything else
  is skipped) and answers every connection there with one line, `hpcprune <step> <store port>`; a
  rank tries the candidates in order until a line names its own step. Two steps of one job start
  from the same candidates, so the second one to bind moves on, and each rank finds its own.

Hand-written because torch's TCPStore client cannot probe an unknown port: pointed at a service
that accepts and says nothing, it was seen to block past its own timeout. Here every probe is a
plain socket with our timeouts, and only the announced store port is given to TCPStore.
"""

from __future__ import annotations

import datetime
import re
import socket
import threading
import time

import torch.distributed as dist

from hpcprune.dist.world import World

CANDIDATES = 64
FIRST_PORT, PORT_SPAN, STRIDE = 20000, 20000, 7919  # candidates in [20000, 40000), a prime apart
PROBE_TIMEOUT_S = 2.0


def candidate_ports(job_id: str) -> list[int]:
    """The ports every rank of a job tries, in order (the same list for each step of the job)."""
    start = int(re.sub(r"\D", "", job_id) or 0) * STRIDE
    return [FIRST_PORT + (start + index * STRIDE) % PORT_SPAN for index in range(CANDIDATES)]


def open_store(host: str, port: int, rank: int, size: int, timeout: datetime.timedelta) -> dist.TCPStore:
    """Rank 0 opens the store on `port` (0: the kernel's choice) and keeps it; the others connect to it."""
    return dist.TCPStore(host, port, size, is_master=rank == 0, wait_for_workers=False, timeout=timeout)


def store_over(world: World, host: str, port: int, timeout: datetime.timedelta) -> dist.TCPStore:
    """The store of a world whose ranks can already talk (MPI): rank 0 broadcasts `host:port` of its own."""
    store = open_store(host, port, 0, world.size, timeout) if world.is_root else None
    address = world.broadcast_bytes(f"{host}:{store.port}".encode() if world.is_root else None).decode()
    if world.is_root:
        return store
    root_host, _, root_port = address.rpartition(":")
    return open_store(root_host, int(root_port), world.rank, world.size, timeout)


class Announcer:
    """Rank 0's side: the first candidate port it can bind, answering each connection with one line."""

    def __init__(self, step: str, store_port: int, candidates: list[int]):
        self.line = f"hpcprune {step} {store_port}\n".encode()
        self.listener, self.port = _bind_first(candidates)
        self.listener.settimeout(0.5)  # how often the loop looks whether it should stop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="hpcprune-rendezvous", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            with connection:
                try:
                    connection.sendall(self.line)
                except OSError:
                    pass  # a prober that left at once

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.listener.close()


def _bind_first(candidates: list[int]) -> tuple[socket.socket, int]:
    for port in candidates:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind(("", port))
            listener.listen(64)
            return listener, port
        except OSError:  # held by another step, job or program: the next candidate
            listener.close()
    raise RuntimeError(f"none of the {len(candidates)} rendezvous ports {candidates[0]}... is free on this host")


def find_announced(host: str, step: str, candidates: list[int], deadline: float) -> int:
    """A rank other than 0: the store port that rank 0 of `step` announces on one of `candidates`."""
    expected = f"hpcprune {step} "
    while time.monotonic() < deadline:
        for port in candidates:
            line = _read_line(host, port)
            if line is not None and line.startswith(expected):
                return int(line.removeprefix(expected))
        time.sleep(0.2)  # rank 0 is not listening yet
    raise RuntimeError(f"rank 0 of {step} did not announce its store on {host} (ports {candidates[0]}... )")


def _read_line(host: str, port: int) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S) as connection:
            data = b""
            while not data.endswith(b"\n") and len(data) < 200:
                piece = connection.recv(200)
                if not piece:
                    break
                data += piece
            return data.decode(errors="replace").strip()
    except OSError:  # refused, timed out, reset: not (yet) ours
        return None


def store_by_announcement(host: str, rank: int, size: int, job_id: str, step: str,
                          timeout: datetime.timedelta) -> tuple[dist.TCPStore, Announcer | None]:
    """The store of ranks that have no channel yet; rank 0 also returns its Announcer, to close once
    every rank has joined the process group."""
    candidates = candidate_ports(job_id)
    if rank == 0:
        store = open_store(host, 0, rank, size, timeout)
        return store, Announcer(step, store.port, candidates)
    port = find_announced(host, step, candidates, time.monotonic() + timeout.total_seconds())
    return open_store(host, port, rank, size, timeout), None
