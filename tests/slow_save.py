"""train_hypernetwork.py with the checkpoint save of one step paused after its files are written and before it is
renamed into place, so that a test can kill the run there:

    python tests/slow_save.py STEP SECONDS TRAINING_ARGS...
"""

import os
import runpy
import sys
import time

import accelerate

step, seconds = int(sys.argv[1]), float(sys.argv[2])
real_save_state = accelerate.Accelerator.save_state


def save_state(self, output_dir=None, **kwargs):
    result = real_save_state(self, output_dir, **kwargs)
    if os.path.basename(str(output_dir)).startswith(f"checkpoint-{step}."):
        time.sleep(seconds)
    return result


accelerate.Accelerator.save_state = save_state
script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_hypernetwork.py")
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
