"""Shared fixtures: the lema binary (LEMA_BIN) and helpers to run it."""
import json
import os
import struct
import subprocess
from pathlib import Path

import pytest


def lema_bin() -> str:
    path = os.environ.get("LEMA_BIN")
    if not path:
        pytest.fail("LEMA_BIN must name the lema executable (ctest sets it)")
    return path


def run_lema(*args, check=True):
    proc = subprocess.run([lema_bin(), *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"lema {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def process_read_bytes(pid: int) -> int:
    """Bytes the process has read so far (rchar of /proc/<pid>/io): how far a run has got."""
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def inspect_json(path) -> dict:
    return json.loads(run_lema("inspect", path, "--json").stdout)


def read_header(path) -> tuple[int, dict]:
    """(header length N, parsed header) of a safetensors file, read without lema."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def file_bytes(path, offset: int, nbytes: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(nbytes)


@pytest.fixture
def tmp(tmp_path) -> Path:
    return tmp_path
