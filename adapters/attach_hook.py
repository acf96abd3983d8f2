"""The former name of `trainwarden.adapters.attach`, kept so that `python -m
trainwarden.adapters.attach_hook DIR` (the command earlier README versions gave) and the
sitecustomize files an older trainwarden wrote (`attach_hook.install()`) keep working."""

from trainwarden.adapters.attach import *  # noqa: F403
from trainwarden.adapters.attach import __all__, install, uninstall  # noqa: F401

if __name__ == "__main__":
    import runpy

    runpy.run_module("trainwarden.adapters.attach", run_name="__main__")
