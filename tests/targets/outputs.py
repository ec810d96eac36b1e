"""Targets whose outputs are odd but reproducible: metrics that are no numbers, NaN weights."""
import torch


def _model():
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _fit(model, ctx, steps, lr, log):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    for step in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        log(step, loss)
    return model


def bad_metrics(ctx):
    """Logs a string, None, a vector and a NaN alongside a good loss; the training itself is deterministic."""
    def log(step, loss):
        ctx.log(step=step, epoch=0, loss=loss, phase="train", acc=None if step == 1 else 0.5,
                grad_norms=torch.ones(3), ratio=float("nan"), ceiling=float("inf"))
    return _fit(_model(), ctx, 3, 0.1, log)


def nan_weights(ctx):
    """Blows up the same way every time: NaN in the first layer's weights (and all that follows)."""
    model = _fit(_model(), ctx, 2, 0.1, lambda step, loss: None)
    with torch.no_grad():
        model[0].weight[0, :3] = float("nan")
        model[2].bias[1] = float("-inf")
    return model


def nan_in_one_replica(ctx):
    """Replica 1 ends with a NaN weight, replica 0 does not: not reproducible, and not finite either."""
    model = _fit(_model(), ctx, 2, 0.1, lambda step, loss: None)
    if ctx.replica == 1:
        with torch.no_grad():
            model[0].weight[2, 3] = float("nan")
    return model
