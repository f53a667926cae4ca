"""The processes of one run, as one: what one process learns (an error, a stop signal, a lost peer), every process
learns at the same step, so that all of them stop together, each with the same one line.

A process that fails keeps its error until the run's next exchange (`together`, `on_main`, or the step's own gather
through `Processes.failed`), where every process receives it and raises it. A process that goes away or stops
answering is found by the exchange that waits for it (bounded by the process group's timeout, `--ddp_timeout`);
every remaining process then names it from the rendezvous store, where each process records its node and the step
it reached.
"""

import atexit
import contextlib
import datetime
import os
import re
import socket
import threading
import time

from .errors import ArgumentError, HypernetError, first_line
from .files import atomic_write

RESUME_HINT = "continue with --resume_from_checkpoint latest once every node is back"


class PeerLost(HypernetError):
    """Another process of the run ended or stopped answering."""


HEARTBEAT_SECONDS = 1.0


class Processes:
    """The run's processes, given accelerate's state. Single-process runs exchange nothing. `Processes.current` is
    the newest, the one that names a lost process when an exchange fails.

    With several processes, each beats a heartbeat into the rendezvous store (MASTER_ADDR:MASTER_PORT, torchrun's or
    the main process's) from a thread of its own: its node, a count and the step it reached. A process whose count
    stops is the one that went away."""

    current = None

    def __init__(self, state):
        Processes.current = self
        self.state = state
        self.rank, self.count = state.process_index, state.num_processes
        self.step = 0
        self.stopped = threading.Event()
        # The store is where torch's launchers put it; a launcher that names none leaves the processes unnamed.
        self.beating = self.count > 1 and {"MASTER_ADDR", "MASTER_PORT"} <= set(os.environ)
        self.beat = None
        if self.beating:
            self.beat = threading.Thread(target=self._beat, args=(open_store(),), daemon=True)
            self.beat.start()
            atexit.register(self.close)  # before the interpreter's teardown: a store call cut off there aborts

    def close(self):
        """Stop the heartbeat and wait for it to end."""
        self.stopped.set()
        if self.beat is not None:
            self.beat.join(timeout=10)

    def _beat(self, store):
        store.set(f"hypernet/node/{self.rank}", socket.gethostname())
        count = 0
        while not self.stopped.is_set():
            count += 1
            try:
                store.set(f"hypernet/alive/{self.rank}", f"{count} {self.step}")
            except Exception:  # the store went away with the process that held it; the next exchange says so
                return
            self.stopped.wait(HEARTBEAT_SECONDS)

    def reached(self, step):
        """The step this process reached, which its heartbeat carries, so that the others can name it."""
        self.step = step

    def _gather(self, item):
        from accelerate.utils import gather_object

        return gather_object([item]) if self.count > 1 else [item]

    def together(self, function, *args):
        """`function(*args)` on every process; where it raises a HypernetError on any, every process raises it."""
        try:
            result, error = function(*args), None
        except HypernetError as e:
            result, error = None, e
        self.raise_first(error)
        return result

    def on_main(self, function, *args, share=True):
        """`function(*args)` on the main process alone; its result shared with the others (None to them where not
        `share`), and a HypernetError it raises raised on every process."""
        result, error = None, None
        if self.state.is_main_process:
            try:
                result = function(*args)
            except HypernetError as e:
                error = e
        if self.count > 1:
            from accelerate.utils import broadcast_object_list

            shared = [result if share else None, error]
            broadcast_object_list(shared)
            error = shared[1]
            result = shared[0] if share or not self.state.is_main_process else result
        if error is not None:
            raise error
        return result

    def raise_first(self, error):
        """Every process calls this with its error or None; every process raises the first rank's error, if any.
        Costs one exchange where there are several processes."""
        errors = self._gather(error)
        failed = next((e for e in errors if e is not None), None)
        if failed is not None:
            raise failed

    def describe_loss(self, error):
        """One line about an exchange that failed because a process went away or stopped answering: the processes
        whose heartbeat stopped, read twice, a few beats apart."""
        cause = re.sub(r"^\[[^\]]*\]\s*", "", first_line(error)).split(". This is typically")[0]
        if not self.beating:
            return f"lost a process of the run: it ended or stopped answering ({cause}); every process stops here; {RESUME_HINT}"
        try:
            store = open_store(timeout=10)
            before = self._heartbeats(store)
            time.sleep(3 * HEARTBEAT_SECONDS)
            after = self._heartbeats(store)
            nodes = {rank: store.get(f"hypernet/node/{rank}").decode() for rank in after}
        except Exception:
            master = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            who = f"the main process or its node (the run's store at {master} is gone)"
        else:
            gone = [rank for rank in after if rank != self.rank and before[rank][0] == after[rank][0]]
            who = ", ".join(f"rank {r} on node {nodes[r]} (last at step {after[r][1]})" for r in gone)
            who = who or "a process of the run"
        self.stopped.set()
        return f"lost {who}: it ended or stopped answering ({cause}); every process stops here; {RESUME_HINT}"

    def _heartbeats(self, store):
        beats = {}
        for rank in range(self.count):
            count, step = store.get(f"hypernet/alive/{rank}").decode().split()
            beats[rank] = (int(count), int(step))
        return beats

    @contextlib.contextmanager
    def watched(self):
        """An exchange that fails because a process went away or stopped answering (gloo's or NCCL's
        RuntimeError, a timeout) becomes a PeerLost naming it."""
        try:
            yield
        except RuntimeError as e:
            if self.count == 1 or not lost_peer(e):
                raise
            raise PeerLost(self.describe_loss(e)) from None


def open_store(timeout=None):
    """A client of the run's rendezvous store."""
    import torch.distributed

    timeout = datetime.timedelta(seconds=timeout) if timeout else torch.distributed.constants.default_pg_timeout
    port = int(os.environ["MASTER_PORT"])
    return torch.distributed.TCPStore(os.environ["MASTER_ADDR"], port, is_master=False, timeout=timeout)


def check_shared_folder(state, directory, argument):
    """Every process sees the same `directory`: what the main process writes there, the others read. Refused (an
    ArgumentError about `argument`, on every process) where a node has a folder of its own under the same path."""
    if state.num_processes == 1:
        return
    from accelerate.utils import broadcast_object_list, gather_object

    token = [os.urandom(8).hex() if state.is_main_process else None]
    marker = os.path.join(directory, ".shared-check")
    if state.is_main_process:
        with atomic_write(marker) as tmp, open(tmp, "w") as f:
            f.write(token[0])
    broadcast_object_list(token)
    try:
        with open(marker) as f:
            sees = f.read() == token[0]
    except OSError:
        sees = False
    seen = gather_object([(sees, socket.gethostname())])
    if state.is_main_process:
        os.remove(marker)
    if not all(sees for sees, _ in seen):
        blind = sorted({node for sees, node in seen if not sees})
        raise ArgumentError(
            argument,
            f"{directory}: not the same folder on every node (on {', '.join(blind)} it is another folder); give a "
            "folder on a filesystem every node mounts",
        )


def lost_peer(error):
    text = str(error).lower()
    words = ("connection reset", "connection closed", "connection refused", "timed out", "timeout", "broken pipe")
    return any(w in text for w in words) or type(error).__name__ in ("DistBackendError", "DistNetworkError")
