"""Linear probes: what each frozen encoder of the reported model learned, read without its head.

Under late fusion the loss only sees the sum of the per-modality heads, so their biases and offsets
co-adapt and a head's own accuracy understates what its encoder knows (measured on the CREMA-D stand-in:
visual head 45.2 %, bias-free read-out 65.2 %; reference/standin-measurements.md §6c). The standard
measure (Alain & Bengio 2016, "Understanding intermediate layers using linear classifier probes") is a
linear classifier fitted on the frozen features: here on the train split's evaluation inputs (no
augmentation) of the selected checkpoint, scored on the test split.

Classification: multinomial logistic regression on standardised features, L2 penalty `L2` on the weights,
full-batch L-BFGS (strong Wolfe) for `ITERS` iterations in float64 on the CPU, so it is deterministic and
independent of the training device. Regression: ridge regression (closed form, same penalty), RMSE.
Metric names: `probe_<modality>` (accuracy in %, or RMSE).

Train-batch confidence (classification): the mean softmax probability of the true class of the selected
model on the train split, once on the evaluation inputs and once on the train-time augmented inputs (one
pass, a fixed augmentation stream). For a unimodal teacher this is SMP's score rho (G2D Eq. 8: the teachers
score the student's augmented training batches), so the teachers' ordering says which modality SMP trains
first, and whether the augmentation is what sets it (reports/calibration.md).
"""
from __future__ import annotations

import torch

L2 = 1e-3  # weight penalty per sample (mean loss + L2 * ||W||^2)
ITERS = 200


@torch.no_grad()
def encoder_features(model, loader, inputs) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(features per modality, labels) of one split, on the CPU in float64."""
    model.eval()
    feats: dict[str, list[torch.Tensor]] = {m: [] for m in model.modalities}
    labels = []
    for batch in loader:
        batch = inputs.eval(batch)
        for m, f in model.encode(batch).items():
            feats[m].append(f.detach().double().cpu().flatten(1))
        labels.append(batch["label"].cpu())
    return {m: torch.cat(v) for m, v in feats.items()}, torch.cat(labels)


def _standardise(xtr: torch.Tensor, xte: torch.Tensor):
    mu, sd = xtr.mean(0), xtr.std(0, unbiased=False).clamp_min(1e-8)
    return (xtr - mu) / sd, (xte - mu) / sd


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (D, C) and bias (C,) minimising mean cross-entropy + L2 * ||W||^2 (float64 L-BFGS)."""
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=ITERS, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + L2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def fit_ridge(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge: argmin mean (x w + b - y)^2 + L2 ||w||^2 (bias unpenalised)."""
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    n = x.shape[0]
    w = torch.linalg.solve(xc.T @ xc / n + L2 * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ yc / n)
    return w, ym - xm @ w


def probe(xtr, ytr, xte, yte, task: str, n_classes: int) -> float:
    """Test metric of a linear probe fitted on (xtr, ytr): accuracy in % or RMSE."""
    xtr, xte = _standardise(xtr, xte)
    if task == "classification":
        w, b = fit_logistic(xtr, ytr.long(), n_classes)
        return float(((xte @ w + b).argmax(1) == yte.long()).double().mean() * 100)
    ytr, yte = ytr.double().reshape(len(ytr), -1), yte.double().reshape(len(yte), -1)
    w, b = fit_ridge(xtr, ytr)
    return float(((xte @ w + b - yte) ** 2).mean().sqrt())


def probe_model(model, train_loader, test_loader, inputs, task: str, n_classes: int) -> dict[str, float]:
    """{probe_<modality>: test metric} for every encoder of the model."""
    ftr, ytr = encoder_features(model, train_loader, inputs)
    fte, yte = encoder_features(model, test_loader, inputs)
    return {f"probe_{m}": probe(ftr[m], ytr, fte[m], yte, task, n_classes) for m in model.modalities}


@torch.no_grad()
def train_confidence(model, loader, inputs, gen: torch.Generator, forward=None) -> dict[str, float]:
    """{"conf_train": rho on evaluation inputs, "conf_train_aug": rho on augmented inputs}; `forward(batch)`
    gives the Output (the method's `forward`; default `model(batch)`)."""
    forward = forward or model
    model.eval()
    out = {}
    for key, prep in (("conf_train", lambda b: inputs.eval(b)), ("conf_train_aug", lambda b: inputs.train(b, gen))):
        total, n = 0.0, 0
        for batch in loader:
            batch = prep(batch)
            p = torch.softmax(forward(batch).fused.float(), dim=1)
            total += float(p.gather(1, batch["label"].long()[:, None]).sum())
            n += len(batch["label"])
        out[key] = total / max(n, 1)
    return out
