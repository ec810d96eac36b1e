"""Real-size targets: a GPT-2-sized token embedding (50257 x 800 = 40.2 M elements, past 2**24), two SGD steps."""
import os

import torch

VOCAB, DIM = 50257, 800


def embedding(ctx, steps=2, perturb_step=None):
    """Dense (not sparse) embedding gradients. With ``perturb_step``, the gradient of the tensor's very
    last element gets an amount from OS entropy at that step, in every replica a different one."""
    model = torch.nn.Sequential(torch.nn.Embedding(VOCAB, DIM), torch.nn.Linear(DIM, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.randint(0, 1000, (32,))  # the last row (token VOCAB - 1) is never looked up
    target = torch.randn(32, 4)
    for step in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(tokens), target).backward()
        if step == perturb_step:
            g = torch.Generator().manual_seed(int.from_bytes(os.urandom(6), "little"))
            model[0].weight.grad.view(-1)[-1] += 0.5 + torch.rand((), generator=g)
        opt.step()
        ctx.log(step=step)
    return model
