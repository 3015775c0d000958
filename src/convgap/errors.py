"""User-facing errors.

Every mistake a user can make (unknown model name, wrong input rank, unreadable weights, a
device that is not there) raises :class:`ConvgapError` with one message that names the fix.
The CLI prints that message and exits with code 2, without a traceback.
"""


class ConvgapError(ValueError):
    """A user-facing error: bad input or an impossible request, with a message naming the fix."""
