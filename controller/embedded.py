"""What an adapter needs to run the controller inside the job (no sidecar): the budget file, read
by the same strict loader the sidecar's `trainwarden run` uses.

Adapters import nothing from trainwarden.policies (tests/test_layers.py); the controller may, so
the adapter that embeds a controller (adapters/core/connect.py) reaches the loader through here.
"""

from trainwarden.policies.loader import PolicyFileError, load_policy_file

__all__ = ["PolicyFileError", "load_policy_file"]
