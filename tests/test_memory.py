import json
import subprocess
import sys
import textwrap

import pytest

from hypernet.memory import retain_freed_memory

# Six "steps" that each allocate and free 128 one-MiB tensors and a 64 MiB one, like a UNet step's activations;
# prints the page faults each step took.
STEPS = textwrap.dedent(
    """
    import json, resource, sys, torch
    from hypernet.memory import retain_freed_memory
    if sys.argv[1] == "retain":
        assert retain_freed_memory()
    faults = []
    for _ in range(6):
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        activations = [torch.ones(1 << 18) for _ in range(128)] + [torch.ones(1 << 24)]
        del activations
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
    print(json.dumps(faults))
    """
)


def page_faults_per_step(mode):
    result = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_memory_is_reused_without_page_faults():
    step_pages = (128 * 2**20 + 64 * 2**20) // 4096
    released = page_faults_per_step("default")
    retained = page_faults_per_step("retain")
    assert released[0] > step_pages // 2 and retained[0] > step_pages // 2  # the first step maps its memory
    # glibc's default hands at least the 64 MiB block back each step; retained, the later steps take none.
    assert all(faults >= 2**26 // 4096 for faults in released[3:])
    assert all(faults < 100 for faults in retained[3:]), retained


def test_retain_freed_memory_reports_whether_it_applied():
    assert retain_freed_memory() is sys.platform.startswith("linux")
