"""A training job with a steady, known step rate, for fault tests: a tiny model whose steps
take `--step-ms` (a sleep stands for the device's compute), attached through the plain-PyTorch
adapter. It writes nothing of its own: the controller's telemetry says what it did."""

from __future__ import annotations

import argparse
import time

import torch

from trainwarden.adapters import pytorch as tw


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--step-ms", type=float, default=10.0)
    args = p.parse_args()
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    handle = tw.attach(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        global_batch_size=16,
        micro_batch_size=16,
        tokens_per_sample=8,
    )

    def batches():  # type: ignore[no-untyped-def]
        g = torch.Generator().manual_seed(0)
        while True:
            x = torch.randn(16, 8, generator=g)
            yield x, x.sum(dim=1, keepdim=True)

    for step_batch in handle.steps(batches()):
        for x, y in step_batch:
            handle.backward(torch.nn.functional.mse_loss(model(x), y))
        time.sleep(args.step_ms / 1000)
        handle.step()
        if handle.step_count >= args.steps or handle.should_stop:
            break
    handle.close()
    print(f"done at step {handle.step_count}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
