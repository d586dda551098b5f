"""Errors reported as one line, no traceback: ``python -m train`` prints ``error: <message>`` and exits with
status 1, or 2 for a :class:`ConfigError`. Each part of the program raises its own subclass."""


class RunError(Exception):
    """The run cannot go on; the message is meant for the user, as is."""


class ConfigError(RunError):
    """The options given cannot be honoured (exit status 2, like a usage error)."""


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
