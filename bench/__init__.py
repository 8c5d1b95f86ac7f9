"""The benchmarks (``python -m bench.NAME``); each compares the engine with its named peer in one run.

Every bench runs under the allocator policy every ``mimetic`` command runs under (``engine.cli.main``),
set here before torch starts its threads: the engine and its peers are measured as users run them.
"""

from engine.models.allocator import keep_freed_memory

keep_freed_memory()
