"""The one exception type that means "the user gave us something wrong".

Jobs turn a `UserError` into exit code 2 and one line naming the thing and the fix
(see `jobs.cli.run`); anything else is an internal failure (exit code 1).
"""


class UserError(Exception):
    """Bad input from the user: a flag, a URI, a file, an annotation."""
