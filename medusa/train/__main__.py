"""``python -m medusa.train``: see ``medusa.train.cli``.  Logs a short summary (no raw JSON: the
metrics are in ``--out``/metrics.json); errors a user can fix end as one log line and exit status 2."""
import sys

from .cli import run

sys.exit(run())
