import logging
from contextlib import contextmanager


class HypernetError(Exception):
    """Base of every error hypernet raises on purpose; its message names the file or flag and what to do."""


class FormatError(HypernetError):
    """A hypernetwork file is unreadable, unsafe, or not a hypernetwork."""


class WidthMismatchError(HypernetError):
    """A hypernetwork has no width that the model's attention layers use."""


class NotAHypernetworkError(FormatError):
    """A readable file that holds something else (a checkpoint, a LoRA)."""


class UsageError(HypernetError):
    """A bad flag, path or piece of training data, reported before any heavy work."""


class ArgumentError(UsageError):
    """A bad value given to a library function. `argument` names the function's argument; the message follows that
    name (`checkpoint latest: ...`, `clip_skip 13: use 1 to 12`). A script turns it into an error about the flag
    that gave the value: `about("--flag")`, or `flag_errors` around a block."""

    def __init__(self, argument, message):
        super().__init__(argument, message)  # both in args, so that it pickles (processes exchange errors)
        self.argument, self.message = argument, message

    def __str__(self):
        return f"{self.argument} {self.message}"

    def about(self, flag):
        return UsageError(f"{flag} {self.message}")


@contextmanager
def flag_errors(**flags):
    """Inside the block, an ArgumentError about an argument named here becomes a UsageError about its flag, as in
    `with flag_errors(data_dir="--train_data_dir"): ...`; others pass through."""
    try:
        yield
    except ArgumentError as e:
        if e.argument not in flags:
            raise
        raise e.about(flags[e.argument]) from None


def first_line(error):
    """An exception's message for a one-line error: its first line, at most 200 characters; "" when it has none."""
    text = str(error)
    return text.splitlines()[0][:200] if text else ""


def printable(text):
    """`text` safe for one line of a terminal: control characters (a newline or an escape sequence in a file name)
    escaped as Python escapes them, so that no name can forge a line or recolour the screen."""
    text = str(text)
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class PrintableFormatter(logging.Formatter):
    """A logging formatter whose every record is printable(): one line each, whatever names it holds."""

    def format(self, record):
        return printable(super().format(record))


def run_script(main):
    """Run a script's main(); a HypernetError becomes one line on stderr, named after the command, and exit code 2."""
    import os
    import sys

    try:
        result = main()
    except HypernetError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {printable(e)}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0
