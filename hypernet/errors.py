class HypernetError(Exception):
    """Base of every error hypernet raises on purpose; its message names the file or flag and what to do."""


class FormatError(HypernetError):
    """A hypernetwork file is unreadable, unsafe, or not a hypernetwork."""


class WidthMismatchError(HypernetError):
    """A hypernetwork has no width that the model's attention layers use."""


class NotAHypernetworkError(FormatError):
    """A readable file that holds something else (a checkpoint, a LoRA)."""
