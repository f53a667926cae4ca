"""The rules the scripts' numeric flags follow: one table, so that generate.py refuses what training refuses, before
anything loads and in the same words."""

import difflib
import math
from dataclasses import dataclass

from .errors import UsageError

MAX_SIDE = 8192  # pixels: the largest image side trained or generated
MAX_SEED = 2**32 - 1  # numpy's, which seeds every generator of a training run
MAX_GUIDANCE_SCALE = 100.0  # the webui's CFG Scale slider goes to 30; beyond 100 the latents overflow to NaN
MAX_MULTIPLIER = 100.0  # a hypernetwork's strength either way; the webui's own UI goes to 2


@dataclass(frozen=True)
class Rule:
    """A number from `low` to `high` (`high` itself excluded where `below`), a multiple of `multiple` if given."""

    low: float
    high: float = math.inf
    multiple: int = 0
    below: bool = False
    unit: str = ""
    note: str = ""

    def allows(self, value):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < self.low:
            return False
        if value > self.high or (self.below and value == self.high):
            return False
        return not (self.multiple and value % self.multiple)

    def describe(self):
        low, high = (_number(x) for x in (self.low, self.high))
        unit = f" {self.unit}" if self.unit else ""
        note = f" ({self.note})" if self.note else ""
        if self.multiple:
            return f"must be a multiple of {self.multiple} from {low} to {high}{unit}{note}"
        if self.below:
            return f"must be at least {low} and below {high}{note}"
        if self.high == math.inf:
            return f"must be {'0 or more' if self.low == 0 else f'at least {low}'}{unit}{note}"
        return f"must be from {low} to {high}{unit}{note}"

    def check(self, flag, value):
        """Refuse `value` in one line naming `flag` (with its dashes) and the rule; None is a flag left out."""
        if value is not None and not self.allows(value):
            raise UsageError(f"{flag} {value}: {self.describe()}")


COUNT = Rule(1)
NONNEGATIVE = Rule(0)
SIDE = Rule(8, MAX_SIDE, multiple=8, unit="pixels")
SEED = Rule(0, MAX_SEED)
SAMPLING_STEPS = Rule(1)  # and at most the scheduler's timesteps: check_sampling_steps, once the model is known
GUIDANCE_SCALE = Rule(0, MAX_GUIDANCE_SCALE, note="the webui's CFG Scale goes to 30")
MULTIPLIER = Rule(-MAX_MULTIPLIER, MAX_MULTIPLIER)
FRACTION = Rule(0, 1, below=True)
MINUTES = Rule(0.1, unit="minutes")

# Every numeric flag of the scripts; a flag that two scripts share, or that mirrors another script's, has one rule.
FLAG_RULES = {
    # how many
    "num_images": COUNT,
    "batch_size": COUNT,
    "train_batch_size": COUNT,
    "gradient_accumulation_steps": COUNT,
    "max_train_steps": COUNT,
    "max_bad_steps": COUNT,
    "num_preview_images": COUNT,
    "checkpoints_total_limit": COUNT,
    # how often, how long (0: never, none)
    "save_every": NONNEGATIVE,
    "checkpointing_steps": NONNEGATIVE,
    "preview_every": NONNEGATIVE,
    "dataloader_num_workers": NONNEGATIVE,
    "lr_warmup_steps": NONNEGATIVE,
    "snr_gamma": NONNEGATIVE,
    "noise_offset": NONNEGATIVE,
    "adam_weight_decay": NONNEGATIVE,
    "adam_epsilon": NONNEGATIVE,
    "adam_beta1": FRACTION,
    "adam_beta2": FRACTION,
    "tag_drop_out": FRACTION,
    "ddp_timeout": MINUTES,
    # sizes, seeds and sampling: generate.py's flags and training's previews
    "width": SIDE,
    "height": SIDE,
    "preview_width": SIDE,
    "preview_height": SIDE,
    "seed": SEED,
    "preview_seed": SEED,
    "num_inference_steps": SAMPLING_STEPS,
    "preview_steps": SAMPLING_STEPS,
    "guidance_scale": GUIDANCE_SCALE,
    "preview_guidance_scale": GUIDANCE_SCALE,
}


def _number(x):
    return str(int(x)) if math.isfinite(x) and x == int(x) else f"{x:g}"


def parse_flags(parser, argv):
    """`parser.parse_args(argv)` with every flag spelled in full, and each problem one line: an unknown flag, a
    misspelled one or a prefix of one (which argparse would otherwise take for the flag) names the nearest flags; a
    bad value or a missing flag names the flag."""

    def error(message):
        raise UsageError(message.removeprefix("argument ").replace("arguments are required", "flags are required"))

    parser.allow_abbrev, parser.error = False, error
    required = [action for action in parser._actions if action.required]
    for action in required:  # a misspelled required flag is named as misspelled, not as missing
        action.required = False
    try:
        args, unknown = parser.parse_known_args(argv)
    finally:
        for action in required:
            action.required = True
    if unknown:
        word = next((u for u in unknown if u.startswith("-")), unknown[0]).split("=", 1)[0]
        if not word.startswith("-"):
            raise UsageError(f"{word!r}: not a flag's value; flags come as --name value (see --help)")
        names = [name for action in parser._actions for name in action.option_strings if name.startswith("--")]
        close = difflib.get_close_matches(word, names, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}?" if close else "see --help for the flags"
        raise UsageError(f"{word}: no such flag; {hint}")
    missing = [action.option_strings[0] for action in required if getattr(args, action.dest) is None]
    if missing:
        error(f"the following arguments are required: {', '.join(missing)}")
    return args


def check_flags(args):
    """Every flag of an argparse namespace that FLAG_RULES holds, checked by its rule."""
    for name, rule in FLAG_RULES.items():
        if hasattr(args, name):
            rule.check(f"--{name}", getattr(args, name))


def check_sampling_steps(flag, steps, timesteps):
    """Sampling steps beyond the scheduler's training timesteps have no timestep to sample at."""
    if steps > timesteps:
        raise UsageError(f"{flag} {steps}: at most the scheduler's {timesteps} timesteps")
