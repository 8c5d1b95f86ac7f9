"""The allocator policy every ``mimetic`` process runs under (engine.models.allocator): memory a
thread frees is reused by its next allocation instead of being faulted in afresh."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# A thread other than the main one (as the server's engine thread) allocates and frees a 64 MiB
# buffer, touching every page, ten times; the page faults of the last nine are counted.
_PROBE = r"""
import ctypes, json, resource, sys, threading
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
if sys.argv[1] == "on":
    from engine.models.allocator import keep_freed_memory
    said = keep_freed_memory()
else:
    said = None
faults = []
def work():
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffer = libc.malloc(64 << 20)  # as torch allocates a tensor's storage
        ctypes.memset(buffer, 1, 64 << 20)  # every page written
        libc.free(buffer)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(json.dumps({"said": said, "faults": faults[1:]}))
"""

PAGES = (64 << 20) // 4096


def probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the policy is glibc's mallopt")
def test_freed_memory_is_reused_by_the_next_allocation_in_a_worker_thread():
    off, on = probe("off"), probe("on")
    # Without the policy every allocation faults its 16,384 pages in again (the baseline the fix is for).
    assert min(off["faults"]) > PAGES // 2, off
    assert on["said"].startswith("freed memory is kept for reuse"), on
    assert max(on["faults"]) < PAGES // 100, on


def test_every_mimetic_command_sets_it_before_it_parses_its_arguments():
    code = (
        "import engine.models.allocator as a\n"
        "calls = []\n"
        "a.keep_freed_memory = lambda: calls.append('set') or 'x'\n"
        "import engine.cli\n"
        "engine.cli.keep_freed_memory = a.keep_freed_memory\n"
        "engine.cli.main(['version'])\n"
        "print(calls)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "['set']"
