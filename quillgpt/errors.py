"""The one exception type for mistakes a user can make.

Anything raised as `QuillError` reaches the command line as a single line on stderr and exit
status 2 (see `quillgpt.cli`). Library users catch it like any other exception.
"""


class QuillError(Exception):
    """A problem with the user's input: a bad path, config, file, prompt or checkpoint."""
