import platform
import subprocess
import sys

import pytest

from dialogtune.train.malloc import keep_freed_memory

# Allocate, touch and free large buffers of a few sizes, as training steps do; print the page
# faults of the last round (glibc settles on reusing its heap after a few rounds).
PROGRAM = """
import resource, sys
import torch
from dialogtune.train.malloc import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def touch(step):
    big = torch.empty((16 + step % 3) * 2**20)
    big.fill_(1.0)
    small = torch.empty(3 * 2**20)
    small.fill_(1.0)
for step in range(6):
    touch(step)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch(6)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True).stdout
    return int(out.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning is glibc's mallopt")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    pages = 76 * 2**20 // 4096
    assert _faults("default") > pages // 2  # glibc unmaps a large block on free and maps it again
    # Well under a tenth: what still faults in is the interpreter's own churn, which varies run to run.
    assert _faults("keep") < pages // 10


def test_reports_whether_it_applied():
    assert keep_freed_memory() == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
