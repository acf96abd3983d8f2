"""python -m trainwarden.adapters.attach DIR: writes DIR/sitecustomize.py, for a launcher other
than `trainwarden run` (put DIR first on PYTHONPATH and set TRAINWARDEN_ATTACH=1)."""

import sys

from trainwarden.adapters.attach.env import write_site_dir

print(write_site_dir(sys.argv[1] if len(sys.argv) > 1 else "trainwarden-attach").resolve())
