"""The one error users see: a bad recipe, flag, file or checkpoint, reported as one line with exit code 2."""

import functools
import sys

EXIT_BAD_INPUT = 2


class RecipeError(Exception):
    """Bad user input. The message names the file and key (or row) and says what to do."""


def exits_cleanly(fn):
    """Turn a RecipeError into one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RecipeError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_BAD_INPUT)

    return wrapper
