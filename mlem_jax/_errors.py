"""The library's error for bad input.

`InputError` is a `ValueError` (code that catches `ValueError` keeps working) raised only by
the library's own checks, each message naming the argument, file or flag and what was
expected. The command line reports it as one line with exit status 2; any other
`ValueError` is a bug and keeps its traceback."""


class InputError(ValueError):
    """Bad input to mlem_jax: the message names the argument and what was expected."""
