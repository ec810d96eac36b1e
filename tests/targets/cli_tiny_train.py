"""A tiny training for the CLI and --mlrepro-target tests:
`python cli_tiny_train.py [--steps N] [--unseeded] [--noisy-loss] [--crash]`.

As a script it seeds torch itself unless --unseeded; --noisy-loss scales the loss by python's `random`,
which it never seeds; --crash raises after the first step. `cli_tiny_train.py:train` never seeds (harness
seeding hides that)."""
import argparse
import random
import sys

import torch


def train(steps: int = 3, noisy_loss: bool = False, crash: bool = False):
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        if noisy_loss:
            loss = loss * (1 + random.random())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if crash:
            raise RuntimeError(f"tiny_train: planted crash after step {step}")
    return model


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--unseeded", action="store_true")
    parser.add_argument("--noisy-loss", action="store_true")
    parser.add_argument("--crash", action="store_true")
    args = parser.parse_args()
    if not args.unseeded:
        torch.manual_seed(0)
    print(f"tiny_train: {args.steps} steps")
    print("tiny_train: a line on stderr", file=sys.stderr)
    train(args.steps, noisy_loss=args.noisy_loss, crash=args.crash)
