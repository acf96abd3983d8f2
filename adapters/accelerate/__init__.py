"""The Accelerate adapter: `Accelerator` as a drop-in, switched mid-run at step boundaries.

    from trainwarden.adapters.accelerate import Accelerator      # instead of `from accelerate import ...`

- accelerator.py: `Accelerator` (a subclass of accelerate's) and its step boundary;
- precision.py: switching the mixed precision with every object kept;
- loader.py: the training loader, cut at the current micro-batch;
- deepspeed_plugin.py: with a DeepSpeed plugin, the engine is the DeepSpeed adapter's live handle.
"""

from trainwarden.adapters.accelerate.accelerator import Accelerator, TrackedOptimizer
from trainwarden.adapters.accelerate.loader import MicroBatchLoader

__all__ = ["Accelerator", "MicroBatchLoader", "TrackedOptimizer"]
