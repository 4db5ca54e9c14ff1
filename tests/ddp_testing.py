"""Plumbing of the multi-process tests (test_ddp, test_ddp_methods, test_dsc): a free port, and 2 spawned ranks with
a deadline. Light imports only (torch, pytest), so a spawned rank that imports this module starts fast."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(fn: Callable[..., None], *args: Any, timeout_s: float = 50, nprocs: int = WORLD) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes; fail (and stop them) after ``timeout_s``. A rank's
    exception is re-raised here with its traceback."""
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            pytest.fail(f"{fn.__name__}: the {nprocs} ranks did not finish within {timeout_s} s")


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
