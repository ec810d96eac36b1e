"""Seeds torch but not numpy, adds numpy noise in the training loop, and reads data through 2
DataLoader workers (whose start-up makes the stdlib create unseeded generators of its own)."""
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class Noisy(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.tensor([float(i), 1.0], dtype=torch.float32)


if __name__ == "__main__":
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch in DataLoader(Noisy(), batch_size=4, num_workers=2):
        opt.zero_grad()
        noisy = batch + float(np.random.normal())
        model(noisy).pow(2).mean().backward()
        opt.step()
