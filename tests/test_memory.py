"""The long-running processes give freed heap memory back (privifs.memory): a fragmented heap,
as 4 MiB parts interleaved with small allocations leave it, shrinks once trimming runs."""

from __future__ import annotations

import subprocess
import sys

PROBE = r"""
import sys, trio
from privifs import memory
memory.TRIM_EVERY, memory.TRIM_ABOVE = 0.05, 0
MiB = 1 << 20
assert memory.bound_allocator()
warm = bytearray(4 * MiB); del warm      # glibc raises its mmap threshold, as in the daemon
big, keep = [], []
for _ in range(100):                     # 4 MiB blocks with smaller ones between: free cannot trim
    # (256 KiB, not 1 KiB: a 1 KiB block could land in an older hole instead of after its 4 MiB
    # block, leaving the freed blocks at the heap's top, which free() gives back by itself)
    big.append(bytearray(4 * MiB)); keep.append(bytearray(256 * 1024))
del big

async def main():
    with trio.move_on_after(float(sys.argv[1])):
        await memory.trim_memory()

trio.run(main)
print(memory.resident() // MiB)
"""


def resident_after(trim_seconds: float) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, str(trim_seconds)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def test_freed_parts_stay_resident_until_trimmed_then_are_given_back():
    assert resident_after(0) > 300  # the 400 MiB freed is still resident: the case trimming is for
    assert resident_after(1.0) < 100


def test_a_passing_failure_to_read_the_resident_size_does_not_stop_trimming(monkeypatch):
    """One EMFILE opening /proc/self/statm (a flood of connections held every descriptor of the
    engine for a moment) stopped trimming for the process's lifetime."""
    import errno

    import trio

    from privifs import memory

    trims = []
    calls = iter([OSError(errno.EMFILE, "Too many open files"), *[10**12] * 1000])

    def resident() -> int:
        value = next(calls)
        if isinstance(value, Exception):
            raise value
        return value

    class Libc:
        @staticmethod
        def malloc_trim(pad: int) -> int:
            trims.append(pad)
            return 1

    monkeypatch.setattr(memory, "resident", resident)
    monkeypatch.setattr(memory, "_libc", lambda: Libc)
    monkeypatch.setattr(memory, "TRIM_EVERY", 0.01)

    async def main() -> None:
        with trio.move_on_after(0.5):
            await memory.trim_memory()

    trio.run(main)
    assert trims
