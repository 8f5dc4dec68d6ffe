"""Preprocessing: raw images -> hickle batch files, labels, mean image and file lists.

Run it with  sh preprocessing/generate_data.sh [PATHS_YAML]  (or generate_toy_data.sh); see make_data.py.
"""


from lib import UserError


class PrepError(UserError):
    """A problem with the inputs or settings that the user must fix; the message (one line) names it.
    make_data.main prints it as `error: ...` and exits with status 2, without a traceback."""
