"""Exceptions shared by the pipeline modules.

`DataError` marks a problem in the user's data (a malformed JSONL line, a table that fails its
schema) as opposed to a bug or a bad parameter. It subclasses `ValueError` so callers that
already catch `ValueError` keep working, while the stage scripts can catch it specifically and
print its message (which always names the file/line or the column/rows) without a traceback.
"""

from __future__ import annotations


class DataError(ValueError):
    """Input data that cannot be used; the message says where (file and line, or column and rows)."""
