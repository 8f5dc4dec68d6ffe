"""The library behind train.py, train_2gpu.py, validate_performance.py and serve.py."""


class UserError(Exception):
    """Something the user can fix (a config value, a data or snapshot file, a peer worker that
    stopped): the message is one line naming it. Every entry point catches this class alone and
    prints `error: <message>` without a traceback; anything else is a bug and keeps its traceback."""
