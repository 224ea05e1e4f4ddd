"""The error every entry point of corpus encoding raises for a request it cannot carry out."""

from __future__ import annotations


class EncodeError(ValueError):
    """An encoding request that cannot be carried out: a bad input, option, checkpoint or output.

    ``lqae-encode`` shows it as a usage error (exit status 2); from Python,
    :func:`~lqae_sklearn.encoding.encode_dataset` raises it. It is a
    :class:`ValueError`.

    Parameters
    ----------
    message : str
        What is wrong, naming the input.
    param : str, default=None
        The command-line option or argument at fault (``"--layers"``, ``"OUT"``),
        when there is one.

    Examples
    --------
    >>> from lqae_sklearn.encoding import EncodeError, encode_dataset
    >>> try:
    ...     encode_dataset("no/such/folder", "out.jsonl")
    ... except EncodeError as error:
    ...     print(error, "|", error.param)
    'no/such/folder' does not exist | IMAGES
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
