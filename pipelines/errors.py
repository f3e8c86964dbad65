"""The data room's error: every error raised by ingest and the reader is a :class:`PipelineError`.

The specific errors (``ProbeError``, ``DecodeError``, ``AudioDecodeError`` ...) live beside the
code that raises them and subclass it, so a caller can catch the whole room at once. Each
message names the file (and frame or field) it is about.
"""


class PipelineError(Exception):
    """A bad input file, a bad ingest output, or a bad ``--input`` / ``--output`` of the data room."""
