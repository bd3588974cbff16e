"""``python -m medusa.train``: see ``medusa.train.cli``."""
import json

from .cli import main

print(json.dumps(main()))
