"""A real, small training job for the compute-budget tests: the demo's GPT on the demo's corpus,
attached with the plain-PyTorch adapter and an embedded controller, as a user would write it."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainwarden.adapters import pytorch as tw
from trainwarden.controller.protocol import Action
from trainwarden.examples.corpus import WindowSampler, eval_batches, load_domains
from trainwarden.examples.gpt import GPT, GPTConfig

BLOCK = 32
BATCH = 16
TOKENS_PER_STEP = BLOCK * BATCH
CORPUS_BYTES = 400_000


def model_and_optimizer(seed: int = 0, n_embd: int = 64) -> tuple[GPT, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=BLOCK, n_layer=1, n_head=2, n_embd=n_embd))
    return model, model.configure_optimizer(lr=3e-3)


def sampler(seed: int = 0) -> WindowSampler:
    return WindowSampler(load_domains(CORPUS_BYTES), BLOCK, BATCH, seed=seed)


@torch.no_grad()
def held_out_loss(model: GPT) -> float:
    batches = eval_batches(load_domains(CORPUS_BYTES), block_size=BLOCK, batch_size=16, n_batches=1)
    model.eval()
    losses = [float(model(b.x, b.y)[1]) for bs in batches.values() for b in bs]
    model.train()
    return sum(losses) / len(losses)


@dataclass
class Run:
    handle: tw.Handle
    model: GPT
    optimizer: torch.optim.Optimizer
    data: WindowSampler
    run_dir: Path
    lr_multipliers: list[float] = field(default_factory=list)
    """The multiplier each step ran at, step 1 first."""

    @property
    def summary(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "summary.json").read_text())

    def decisions(self) -> list[dict[str, Any]]:
        path = self.run_dir / "decisions.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def write_policy(tmp: Path, text: str) -> Path:
    path = tmp / "policy.yaml"
    path.write_text(text)
    return path


def run_job(
    tmp: Path,
    policy: str,
    *,
    max_steps: int = 100_000,
    seed: int = 0,
    on_stop: Callable[..., Any] | None = None,
    each_step: Callable[[Run], None] | None = None,
    run_dir: Path | None = None,
    model: GPT | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    data: WindowSampler | None = None,
) -> Run:
    """Train until trainwarden says stop (or `max_steps`); `each_step(run)` after every step."""
    if model is None:
        model, optimizer = model_and_optimizer(seed)
    assert optimizer is not None
    run_dir = run_dir or tmp / "run"
    data = data or sampler(seed)
    handle = tw.attach(
        model,
        optimizer,
        global_batch_size=BATCH,
        micro_batch_size=BATCH,
        tokens_per_sample=BLOCK,
        policy=write_policy(tmp, policy),
        run_dir=run_dir,
        on_stop=on_stop,
    )
    run = Run(handle, model, optimizer, data, run_dir)
    try:
        for step_batch in handle.steps(data):
            run.lr_multipliers.append(handle.lr_multiplier)
            for micro in step_batch:
                handle.backward(model(micro.x, micro.y)[1])
            handle.step()
            if each_step is not None:
                each_step(run)
            if handle.should_stop or handle.step_count >= max_steps:
                break
    finally:
        handle.close()
    return run


def act(run: Run, kind: str, value: Any = None) -> None:
    """Apply an action in the job by hand, at this step boundary, as the agent would."""
    params = {} if value is None else {"value": value}
    run.handle.apply(Action(kind=kind, params=params, reason="test", step=run.handle.step_count + 1))
