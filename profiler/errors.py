"""The one exception type that means "the user got something wrong".

Every layer raises `UserError` for bad input (a file, a field, a flag); the CLI
prints its message as one line and exits 2. Anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """A mistake in the user's input, told in one line that names the culprit."""
