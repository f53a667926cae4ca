"""Writing files so that a failure never loses work, and one-line reasons for failed reads and writes."""

import errno
import os
import secrets
import shutil
import stat
from contextlib import contextmanager

from safetensors import SafetensorError

from .errors import ArgumentError, FormatError, HypernetError, first_line


def read_failure(path, error):
    """The FormatError for an OSError while reading `path`: a "regular" file whose read fails (/proc/self/mem, a
    failing disk, a network mount gone away) is refused by name."""
    return FormatError(f"{path}: cannot be read ({error.strerror or first_line(error) or type(error).__name__})")


def write_failure(error, path):
    """Why a write failed, in a few words, with the free space where the disk is full; None where `error` does not
    look like a failed write (torch and safetensors report full disks as RuntimeError and SafetensorError)."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        free = shutil.disk_usage(directory if os.path.isdir(directory) else ".").free
    except OSError:
        free = None
    text = str(error).lower()
    full = getattr(error, "errno", None) == errno.ENOSPC or any(
        w in text for w in ("space", "storagefull", "unexpected pos")
    )
    if full or (free is not None and free < 1 << 20 and not isinstance(error, OSError)):
        return "no space left on the device" + (f": {free / 2**20:.1f} MiB free" if free is not None else "")
    if isinstance(error, OSError):
        return error.strerror or str(error)
    if any(word in text for word in ("write", "i/o", "file", "permission")):
        return first_line(error)
    return None


def check_writable_folder(path, argument="path"):
    """A folder that exists or can be made, and can be written to; else an ArgumentError about `argument`, the
    caller's argument that named the folder."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ArgumentError(argument, f"{path}: is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ArgumentError(argument, f"{path}: not writable ({e.strerror})") from None


@contextmanager
def atomic_writes(paths):
    """Temporary paths beside each of `paths`, renamed into place together once the block succeeds: the files are
    replaced all or none (a failure leaves the previous ones whole). The files get the umask's mode, as open()
    would give them, also where a writer creates its temporary file anew (safetensors' save_file makes it 0600)."""
    temporaries, modes, current = [], [], None
    try:
        for path in paths:
            current = path
            directory = os.path.dirname(os.path.abspath(path))
            os.makedirs(directory, exist_ok=True)
            # at most 240 characters of the name, so that a name up to the file system's 255 bytes has room for it
            tmp = os.path.join(directory, f".{os.path.basename(path)[:240]}.{secrets.token_hex(4)}.tmp")
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            temporaries.append(tmp)
            modes.append(stat.S_IMODE(os.stat(tmp).st_mode))
        current = paths[0]
        yield temporaries
        for path, tmp, mode in zip(paths, temporaries, modes):
            current = path
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
                os.fchmod(f.fileno(), mode)
        for path, tmp in zip(paths, temporaries):
            os.replace(tmp, path)
    except (OSError, RuntimeError, SafetensorError) as e:
        reason = write_failure(e, current)
        if reason is None:
            raise
        for path, tmp in zip(paths, temporaries):
            reason = reason.replace(tmp, str(path))  # the name the caller gave, not ours
        raise HypernetError(f"{current}: could not write ({reason}); the previous file, if any, is intact") from e
    finally:
        for tmp in temporaries:
            if os.path.exists(tmp):
                os.remove(tmp)


@contextmanager
def atomic_write(path):
    """A temporary path beside `path`, renamed onto it only when the block succeeds (see atomic_writes)."""
    with atomic_writes([path]) as (tmp,):
        yield tmp
