"""The one exception type lowbit raises for bad input.

Every message is a single line that names the thing at fault (a file, a layer, an option),
so the CLI can print it as ``error: <message>`` and exit non-zero without a traceback.
"""


class LowbitError(Exception):
    """Bad input or an unusable artifact; the message is one line naming the problem."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
