"""Host memory: keeping freed memory in the process for the next CPU step, or handing it back."""

import ctypes
import os
import sys

# glibc's mallopt() options (malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -2, -3, -8


def retain_freed_memory():
    """Have glibc's malloc keep the memory a step frees for the next step, instead of handing it back to the kernel.

    A training or denoising step on the CPU allocates and frees the same activations every time. glibc returns
    large freed blocks to the kernel (unmapping them, trimming the heap), so each step gets them back one page
    fault at a time (bench/RESULTS.md has the cost). With these settings the heap grows to a step's peak once and
    stays there; the process's resident memory stays at that peak too, which is why the scripts use this on the CPU
    only. Returns False where it does not apply (not glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = (
        (M_ARENA_MAX, 1),  # threads other than the main one allocate from the same, never-trimmed heap
        (M_MMAP_THRESHOLD, 1 << 30),  # blocks below 1 GiB come from the heap, not from mmap/munmap each time
        (M_TRIM_THRESHOLD, -1),  # never give the top of the heap back
        (M_TOP_PAD, 1 << 30),  # grow it in large steps (address space only: pages are mapped when touched)
    )
    return all([mallopt(option, value) == 1 for option, value in settings])


RETAIN_SETTINGS = ("auto", "on", "off")  # the scripts' --retain_freed_memory


def apply_retain_setting(setting, device_type):
    """The scripts' --retain_freed_memory: "on", or "auto" on the CPU (where it makes steps faster), calls
    retain_freed_memory(). Returns True when the setting took effect."""
    if setting == "on" or (setting == "auto" and device_type == "cpu"):
        return retain_freed_memory()
    return False


def release_free_memory():
    """Hand the free memory inside the heap back to the system now (glibc's malloc_trim); False where not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def held_memory(pid=None, proportional=False):
    """Bytes of memory a process and all its descendants (DataLoader workers) hold that the kernel cannot page out
    to their files: RssAnon + RssShmem of each, from /proc (a page a forked worker shares with its parent counts in
    both). proportional: Pss_Anon + Pss_Shmem instead, each shared page counted once in all. Memory-mapped files and
    the page cache are in neither. None where /proc has no such fields (not Linux)."""
    pids, total = [pid or os.getpid()], 0
    source, keys = ("smaps_rollup", ("Pss_Anon", "Pss_Shmem")) if proportional else ("status", ("RssAnon", "RssShmem"))
    for current in pids:
        try:
            with open(f"/proc/{current}/{source}") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            total += sum(int(fields[key].split()[0]) * 1024 for key in keys)
        except (OSError, KeyError, ValueError):
            if current == pids[0]:
                return None
            continue  # a child that exited while we read
        pids += _children(current)
    return total


def _children(pid):
    children = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for task in tasks:
        try:  # a thread can end between the listing and the read
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(child) for child in f.read().split()]
        except OSError:
            pass
    return children


def same_layout(a, b):
    """Whether tensor `b` can be copied into `a` in place (the same shape, dtype and device), so that a buffer is
    reused instead of allocated again; two Nones match."""
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
