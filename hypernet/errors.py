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
    """A bad value given to a library function: `argument` names the function's argument, and the message starts
    with the value. A script turns it into an error about the flag that gave the value: `about("--flag")`."""

    def __init__(self, argument, message):
        super().__init__(message)
        self.argument = argument

    def about(self, flag):
        return UsageError(f"{flag} {self}")


def first_line(error):
    """An exception's message for a one-line error: its first line, at most 200 characters; "" when it has none."""
    text = str(error)
    return text.splitlines()[0][:200] if text else ""


def run_script(main):
    """Run a script's main(); a HypernetError becomes one line on stderr, named after the command, and exit code 2."""
    import os
    import sys

    try:
        result = main()
    except HypernetError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0
