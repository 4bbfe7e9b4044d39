"""Shared helpers for the benchmarks and the notebooks: data loading, two LeNets, training loops, timing.

The notebooks import this module too (``notebooks/_src/*.py`` put ``benchmarks/`` on ``sys.path``):
it is the one place for the Fashion-MNIST loader, the training loops and the accuracy.

Data: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (IDX gz files under
``/usr/share/datasets/fashion-mnist``), parsed with gzip + numpy (no torchvision, no download).
When that package is absent, scikit-learn's bundled 8x8 digits are used instead; ``Data.name``
says which ran.
"""

from __future__ import annotations

import gzip
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = [
    "FASHION_MNIST_DIR",
    "Data",
    "evaluate",
    "lenet5",
    "lenet_300_100",
    "load_data",
    "steps_per_epoch",
    "time_interleaved",
    "train",
    "train_steps",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class Data:
    """A classification data set held in memory.

    ``Xtr``/``Xte`` are float32 tensors of shape ``(n, 1, H, W)`` normalised to zero mean and unit
    variance (train statistics); ``ytr``/``yte`` are int64 labels. ``name`` is ``"fashion-mnist"``
    or ``"digits"``.
    """

    Xtr: torch.Tensor
    ytr: torch.Tensor
    Xte: torch.Tensor
    yte: torch.Tensor
    name: str

    @property
    def in_channels(self) -> int:
        return int(self.Xtr.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.Xtr.shape[-1])

    @property
    def in_features(self) -> int:
        return int(self.Xtr[0].numel())

    @property
    def n_classes(self) -> int:
        return int(max(self.ytr.max(), self.yte.max()).item()) + 1


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte data
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data.reshape(shape)


def _fashion_available(root: Path) -> bool:
    names = [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    return all((root / n).is_file() for n in names)


def _load_fashion(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    xtr = _read_idx(root / "train-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    ytr = _read_idx(root / "train-labels-idx1-ubyte.gz").astype(np.int64)
    xte = _read_idx(root / "t10k-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    yte = _read_idx(root / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    return xtr, ytr, xte, yte


def _load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0).reshape(-1, 8, 8)
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(y))
    n_test = len(y) // 5
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def load_data(
    name: str = "auto",
    *,
    train_subset: int | None = None,
    test_subset: int | None = None,
    root: str | Path = FASHION_MNIST_DIR,
) -> Data:
    """Load Fashion-MNIST (or the scikit-learn digits fallback) into memory.

    Args:
        name: ``"auto"`` (Fashion-MNIST when its files exist, else digits), ``"fashion-mnist"``
            (error if absent) or ``"digits"``.
        train_subset: keep only the first ``train_subset`` training examples (``None``: all).
        test_subset: keep only the first ``test_subset`` test examples (``None``: all).
        root: directory holding the four Fashion-MNIST IDX ``.gz`` files.

    Returns:
        A :class:`Data` with images shaped ``(n, 1, H, W)`` (28x28 or 8x8), standardised with the
        training mean and standard deviation.

    Example:
        >>> data = load_data("digits")
        >>> data.name, data.Xtr.shape[1:]
        ('digits', torch.Size([1, 8, 8]))
    """
    root = Path(root)
    if name not in ("auto", "fashion-mnist", "digits"):
        raise ValueError(f"name must be 'auto', 'fashion-mnist' or 'digits', got {name!r}")
    if name == "fashion-mnist" and not _fashion_available(root):
        raise FileNotFoundError(
            f"Fashion-MNIST IDX files not found under {root}; install Debian's dataset-fashion-mnist package"
        )
    if name == "digits" or (name == "auto" and not _fashion_available(root)):
        xtr, ytr, xte, yte = _load_digits()
        used = "digits"
    else:
        xtr, ytr, xte, yte = _load_fashion(root)
        used = "fashion-mnist"
    if train_subset is not None:
        xtr, ytr = xtr[:train_subset], ytr[:train_subset]
    if test_subset is not None:
        xte, yte = xte[:test_subset], yte[:test_subset]
    mean, std = float(xtr.mean()), float(xtr.std())
    Xtr = torch.from_numpy((xtr - mean) / std).unsqueeze(1).contiguous()
    Xte = torch.from_numpy((xte - mean) / std).unsqueeze(1).contiguous()
    return Data(Xtr, torch.from_numpy(ytr.copy()), Xte, torch.from_numpy(yte.copy()), used)


def lenet_300_100(in_features: int = 784, n_classes: int = 10) -> nn.Module:
    """LeNet-300-100: a fully connected ``in -> 300 -> 100 -> n_classes`` network (flattens its input)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, n_classes),
    )


def lenet5(in_channels: int = 1, n_classes: int = 10, image_size: int = 28) -> nn.Module:
    """A LeNet-5-style CNN: conv(20, 5x5) -> pool -> conv(50, 5x5) -> pool -> fc 500 -> fc classes.

    The Caffe variant used by Han et al. 2015. Small inputs (``image_size < 16``, e.g. the 8x8
    digits) use 3x3 convolutions with padding so the spatial size stays valid.
    """
    if image_size >= 16:
        k, pad = 5, 0
    else:
        k, pad = 3, 1
    s = image_size
    s = (s - k + 2 * pad + 1) // 2
    s = (s - k + 2 * pad + 1) // 2
    if s < 1:
        raise ValueError(f"image_size={image_size} is too small for lenet5")
    return nn.Sequential(
        nn.Conv2d(in_channels, 20, k, padding=pad),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(20, 50, k, padding=pad),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(50 * s * s, 500),
        nn.ReLU(),
        nn.Linear(500, n_classes),
    )


def train(
    model: nn.Module,
    data: Data,
    *,
    epochs: float,
    lr: float,
    batch_size: int = 128,
    seed: int = 0,
    optimizer: str | torch.optim.Optimizer = "adam",
    on_step: Callable[[int], None] | None = None,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """Train ``model`` with cross-entropy on ``data.Xtr``/``data.ytr``.

    Args:
        model: the network (may carry parametrizations; ``model.parameters()`` is optimised).
        data: the data set.
        epochs: number of passes over the training set; fractional values run a partial last epoch.
        lr: learning rate.
        batch_size: minibatch size.
        seed: seeds the shuffling (a private generator; the global RNG is not touched).
        optimizer: ``"adam"``, ``"sgd"`` (momentum 0.9) or an optimizer already built on ``model``.
        on_step: called as ``on_step(step)`` after each optimizer step, ``step`` counting from 1.
            Use it to drive a pruning schedule (``on_step=lambda s: schedule.step()``).
        weight_decay: passed to the optimizer when it is built here.

    Returns:
        The optimizer (so callers can keep training or inspect its state).
    """
    if isinstance(optimizer, str):
        if optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(
                model.parameters(), lr=lr, weight_decay=weight_decay
            )
        elif optimizer == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
        else:
            raise ValueError(f"optimizer must be 'adam', 'sgd' or an Optimizer, got {optimizer!r}")
    else:
        opt = optimizer
    gen = torch.Generator().manual_seed(seed)
    n = data.Xtr.shape[0]
    total = max(1, round(epochs * ((n + batch_size - 1) // batch_size)))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    step = 0
    while step < total:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            if step >= total:
                break
            idx = perm[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(data.Xtr[idx]), data.ytr[idx])
            loss.backward()
            opt.step()
            step += 1
            if on_step is not None:
                on_step(step)
    return opt


def steps_per_epoch(data: Data, batch_size: int) -> int:
    """Number of optimizer steps :func:`train` takes per epoch."""
    return (data.Xtr.shape[0] + batch_size - 1) // batch_size


@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, batch_size: int = 2000) -> float:
    """Classification accuracy of ``model`` on ``(X, y)`` in eval mode (restores the previous mode)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, X.shape[0], batch_size):
        correct += int((model(X[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, X.shape[0])


class _Steppable:  # a pruning schedule or anything else with step()
    def step(self) -> None: ...


def train_steps(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    *,
    lr: float,
    batch_size: int = 128,
    seed: int = 1,
    cosine: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
    schedule: _Steppable | None = None,
    log_every: int = 0,
    X_eval: torch.Tensor | None = None,
    y_eval: torch.Tensor | None = None,
) -> list[tuple[int, float]]:
    """Train ``model`` for ``steps`` minibatches drawn with replacement (the notebooks' loop).

    Each step: ``model.train()``, a cross-entropy step of Adam (or ``optimizer``), the cosine
    learning-rate step (``cosine=True``), then ``schedule.step()`` when a pruning schedule is given.

    Args:
        model: the network.
        X: training inputs; ``y``: their labels.
        steps: number of optimizer steps.
        lr: Adam's learning rate (ignored when ``optimizer`` is given).
        batch_size: minibatch size.
        seed: seeds the minibatch draws (a private generator).
        cosine: anneal the learning rate to 0 over ``steps`` with ``CosineAnnealingLR``.
        optimizer: an optimizer already built on ``model`` (e.g. the one a RigL schedule holds).
        schedule: called as ``schedule.step()`` after every optimizer step.
        log_every: every ``log_every`` steps, record ``(step, evaluate(model, X_eval, y_eval))``.
        X_eval: evaluation inputs for the log; ``y_eval``: their labels.

    Returns:
        The logged ``(step, accuracy)`` pairs (empty when ``log_every`` is 0).
    """
    opt = optimizer if optimizer is not None else torch.optim.Adam(model.parameters(), lr=lr)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cosine else None
    gen = torch.Generator().manual_seed(seed)
    log: list[tuple[int, float]] = []
    for t in range(1, steps + 1):
        model.train()
        idx = torch.randint(len(X), (batch_size,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
        if lr_sched is not None:
            lr_sched.step()
        if schedule is not None:
            schedule.step()
        if log_every and t % log_every == 0:
            if X_eval is None or y_eval is None:
                raise ValueError("log_every needs X_eval and y_eval")
            log.append((t, evaluate(model, X_eval, y_eval)))
    return log


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    budget_s: float = 1.5,
    min_rounds: int = 7,
    max_rounds: int = 60,
    sample_s: float = 0.02,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved rounds.

    Each round takes one sample of every function, in order; a sample times enough back-to-back
    calls to last about ``sample_s`` (timeit-style), so that a preemption by another process is
    averaged over many calls instead of landing whole on one. Rounds continue until ``budget_s``
    of total time has been spent (at least ``min_rounds``, at most ``max_rounds``). ``clock`` times
    the samples (``time.thread_time`` measures one thread's CPU time, robust on a shared machine).
    """
    inner: dict[str, int] = {}
    for k, fn in fns.items():  # warm-up (allocations, MKL handles, caches) and calibration
        fn()
        t0 = clock()
        fn()
        one = max(clock() - t0, 1e-6)
        inner[k] = max(1, min(1000, int(sample_s / one)))
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() - start < budget_s and rounds < max_rounds):
        for k, fn in fns.items():
            n = inner[k]
            t0 = clock()
            for _ in range(n):
                fn()
            times[k].append((clock() - t0) / n)
        rounds += 1
    return {k: statistics.median(v) for k, v in times.items()}
