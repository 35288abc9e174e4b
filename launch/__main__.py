"""``python -m dpeft_launch ARGS``: the `dpeft` command where its console script is not on PATH
(e.g. ``ray job submit ... -- python -m dpeft_launch ray --config run.yaml``)."""

import sys

from dpeft_launch.cli import main

sys.exit(main())
