"""A seeded training whose numerics a test can change from outside, to exercise regression gates.

``MLREPRO_TEST_CHANGE_AT=k`` scales the last layer's bias gradient at optimizer step k (a change whose
first effect is mid-training); ``MLREPRO_TEST_SCALE`` sets how much (default 1.001).
"""
import os

import torch


def train(ctx):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    change_at = int(os.environ.get("MLREPRO_TEST_CHANGE_AT", "-1"))
    scale = float(os.environ.get("MLREPRO_TEST_SCALE", "1.001"))
    for step in range(8):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        if step == change_at:
            model[2].bias.grad.mul_(scale)
        opt.step()
        if step % 2 == 1:
            ctx.log(step=step, epoch=step // 2, val_loss=loss.item())
    return model
