"""trainwarden's live data mixture: named domains whose weights, curriculum level and pruned
examples a data policy changes while the job runs.

Map-style (curriculum and pruning too; exact resume with DataLoader workers):

    from trainwarden.adapters.data import MixtureDataset, MixtureSampler
    data = MixtureDataset({"code": code_ds, "text": text_ds})       # samples come back tagged
    mix = MixtureSampler(data, seed=0)                               # the mixture: knobs, checkpoint
    loader = DataLoader(data, batch_size=B, sampler=mix, num_workers=2)
    handle = trainwarden.adapters.pytorch.attach(model, opt, global_batch_size=B, mixture=mix)
    for step_batch in handle.steps(loader):
        for x, y, index in step_batch:
            per_sample = loss_fn(model(x), y)                        # one loss per sample
            mix.observe(per_sample, index)                           # per-domain loss, no extra forward
            handle.backward(per_sample.mean())
        handle.step()                                                # reports domain_loss, applies knobs

Iterable (weights only): `MixtureIterableDataset({name: iterable, ...})` (iterable.py).

Knobs (controller/protocol.py): `domain_weights` (name -> weight), `curriculum_level` (with a
difficulty per example), `prune_fraction` (with max_prune_fraction > 0). The policy that drives
them is `kind: data` (policies/data.py). `state_dict()`/`load_state_dict()` hold the weights, the
policy's state, the position and (map-style) the per-example records: save them with the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trainwarden.adapters.data.control import DataMixtureError, MixtureControl
from trainwarden.adapters.data.iterable import MixtureIterableDataset
from trainwarden.adapters.data.sampler import MixtureDataset, MixtureSampler, tag_sample

__all__ = [
    "DataMixtureError",
    "MixtureControl",
    "MixtureDataset",
    "MixtureIterableDataset",
    "MixtureSampler",
    "domain_losses",
    "tag_sample",
]


def domain_losses(losses: torch.Tensor, domains: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    """Mean per-sample loss of each domain present, from one loss per sample and each sample's
    domain number: the per-domain loss a handle's `step(domain_loss=...)` takes, from the forward
    pass the step already ran."""
    loss = losses.detach().float().reshape(-1)
    dom = domains.detach().reshape(-1).long().to(loss.device)
    if loss.shape != dom.shape:
        raise DataMixtureError(
            f"{loss.shape[0]} losses for {dom.shape[0]} domain tags: give one loss per sample"
        )
    sums = torch.zeros(len(names), device=loss.device).index_add_(0, dom, loss)
    counts = torch.bincount(dom, minlength=len(names))
    return {n: float(sums[i] / counts[i]) for i, n in enumerate(names) if counts[i] > 0}
