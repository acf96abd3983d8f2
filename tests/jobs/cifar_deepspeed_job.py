"""An image classifier trained with DeepSpeed in the style of DeepSpeedExamples'
`cifar10_deepspeed.py`, as its author would write it: `deepspeed.initialize` with the training
set, the loop over the loader it returns for a number of epochs, an evaluation pass after each
epoch. It knows nothing of trainwarden and never reads a stop flag.

CIFAR-shaped synthetic tensors (3x32x32, 10 classes): torchvision does not load on this CPU
build of torch. One JSON line per optimizer step on stdout: {"step", "rank"}.
"""

from __future__ import annotations

import argparse
import json
import logging

import deepspeed
import torch
import torch.nn.functional as F


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 6, 5)
        self.pool = torch.nn.MaxPool2d(2, 2)
        self.conv2 = torch.nn.Conv2d(6, 16, 5)
        self.fc1 = torch.nn.Linear(16 * 5 * 5, 32)
        self.fc2 = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def synthetic(n: int, seed: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(
        torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    )


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--stage", type=int, default=0)
    p.add_argument("--local_rank", type=int, default=-1)
    args = p.parse_args()
    torch.set_num_threads(1)
    deepspeed.utils.logging.logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    net = Net()
    trainset, testset = synthetic(256, 1), synthetic(64, 2)
    config = {
        "train_batch_size": 16,
        "train_micro_batch_size_per_gpu": 4,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": args.stage},
        "steps_per_print": 10**9,
    }
    model_engine, _, trainloader, _ = deepspeed.initialize(
        args=args, model=net, model_parameters=net.parameters(), training_data=trainset, config=config
    )
    rank = model_engine.global_rank
    criterion = torch.nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        for inputs, labels in trainloader:
            outputs = model_engine(inputs)
            loss = criterion(outputs, labels)
            model_engine.backward(loss)
            model_engine.step()
            print(json.dumps({"step": model_engine.global_steps, "rank": rank}), flush=True)
        model_engine.eval()
        correct = total = 0
        with torch.no_grad():
            for images, labels in torch.utils.data.DataLoader(testset, batch_size=16):
                predicted = model_engine(images).argmax(1)
                correct += int((predicted == labels).sum())
                total += labels.numel()
        model_engine.train()
        if rank == 0:
            print(f"epoch {epoch}: accuracy {correct / total:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
