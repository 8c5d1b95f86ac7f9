"""How a process that runs models allocates host memory: ``keep_freed_memory`` (glibc's malloc, through
``mallopt``). No torch here: ``mimetic`` sets it before anything else starts."""

from __future__ import annotations

import ctypes

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> str:
    """Make this process keep the memory it frees for reuse (glibc), and say what was done.

    A model in a thread other than the main one (the server's engine thread) gets its own malloc
    arena, whose heaps, and every block over the mmap threshold, go back to the OS when freed: the
    next batch's activations (tens of MB per layer) are then page-faulted in and zeroed again. ViT-B-32
    at bf16, batch 64, took ~500,000 page faults and 1.4 s of system time per 128 views in the
    server's thread, against none in the main thread, and ran ~1.4x slower. One arena, no trimming
    and no mmap make every thread reuse what the last batch freed, as PyTorch's CUDA allocator does;
    a long-running process then holds its peak. Call it first, before the threads that allocate start
    (each thread keeps the arena it first had). Elsewhere than glibc it does nothing, and says so.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "the allocator is left as it is: this C library has no mallopt"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = [mallopt(_M_ARENA_MAX, 1), mallopt(_M_TRIM_THRESHOLD, 2**31 - 1), mallopt(_M_MMAP_MAX, 0)]
    if not all(done):
        return f"the allocator refused part of the policy (mallopt returned {done})"
    return "freed memory is kept for reuse (one malloc arena, no trimming, no mmap)"
