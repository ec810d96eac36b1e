"""A script that sizes torch's thread pool the usual way: the variable first, then ``import torch``."""
import os

os.environ["KMP_DUPLICATE_LIB_OK"] = "True"  # what sklearn sets on import: no thread count, never refused
os.environ["OMP_NUM_THREADS"] = "3"  # in a fresh interpreter torch then starts with 3 intra-op threads

import torch  # noqa: E402

model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x = torch.ones(8, 4)
for _ in range(2):
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()
