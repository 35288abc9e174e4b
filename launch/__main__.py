"""``python -m dpeft_launch``: the ``dpeft`` command run by a given interpreter.

Useful where the environment's ``bin/`` is not on ``PATH``, e.g. a Ray job's entrypoint:
``ray job submit -- /path/to/venv/bin/python -m dpeft_launch ray --config run.yaml``.
"""

import sys

from dpeft_launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
