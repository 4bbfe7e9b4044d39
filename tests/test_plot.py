"""The matplotlib helpers render non-empty, non-blank PNGs and never show; missing matplotlib names the extra."""

from __future__ import annotations

import builtins
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import mlp, small_cnn

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from hadamard_sparse import plot  # noqa: E402
from hadamard_sparse.api import register_mask, sparsify  # noqa: E402
from hadamard_sparse.report import sparsity_report  # noqa: E402
from hadamard_sparse.schedules import GradualPruning  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_show(*args: object, **kwargs: object) -> None:
        raise AssertionError("plot helpers must not call plt.show()")

    monkeypatch.setattr(plt, "show", no_show)
    yield
    plt.close("all")


def _render(ax: object, path: Path, min_kb: float = 5.0) -> None:
    assert isinstance(ax, matplotlib.axes.Axes)
    ax.figure.savefig(path, dpi=80)
    assert path.stat().st_size > min_kb * 1024
    img = mpimg.imread(path)
    pixels = img.reshape(-1, img.shape[-1])
    assert len({tuple(p) for p in pixels[:: max(1, len(pixels) // 20000)].tolist()}) > 2


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Linear(40, 24),
        lambda: nn.Conv2d(3, 6, 3),
        lambda: nn.Conv1d(3, 4, 5),
        lambda: nn.Conv3d(2, 3, 2),
    ],
    ids=["linear", "conv2d", "conv1d", "conv3d"],
)
@pytest.mark.parametrize("show", ["mask", "weight"])
def test_mask_renders(make: object, show: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    layer = sparsify(make(), 0.7)
    ax = plot.mask(layer, show=show)
    _render(ax, tmp_path / "mask.png")
    image = ax.get_images()[0].get_array()
    w = layer.weight.detach()
    # The image shows exactly the kept entries (gaps between tiled kernels are NaN).
    if show == "mask":
        kept = int(torch.as_tensor(image.filled(0)).nan_to_num(0).sum())
        assert kept == int((w != 0).sum())
    assert f"sparsity {float((w == 0).float().mean()):.1%}" in ax.get_title()
    assert ax.get_title().startswith(type(make()).__name__)


@pytest.mark.parametrize(
    "make, name, kind", [(small_cnn, "2.weight", "Conv2d"), (mlp, "4.weight", "Linear")], ids=["cnn", "mlp"]
)
def test_mask_by_qualified_name_titles_the_layer(make: object, name: str, kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = sparsify(make(), 0.7)
    ax = plot.mask(model, name=name)
    assert ax.get_title().startswith(f"{name} [")
    layer = model.get_submodule(name.rpartition(".")[0])
    ref = plot.mask(layer)  # the same layer passed directly: same image, titled by its type
    assert ref.get_title().startswith(f"{kind}.weight [")
    a, b = (torch.as_tensor(x.get_images()[0].get_array().filled(-1.0)) for x in (ax, ref))
    assert torch.equal(a.nan_to_num(-2.0), b.nan_to_num(-2.0))
    _render(ax, tmp_path / "named.png")
    for bad in ("9.weight", "2.nope", "", "2."):
        with pytest.raises(ValueError, match="qualified tensor name"):
            plot.mask(model, name=bad)


def test_mask_of_tensor_and_tiling_of_conv_kernels(tmp_path: Path) -> None:
    keep = torch.zeros(2, 3, 3, 3, dtype=torch.bool)
    keep[1, 2] = True
    ax = plot.mask(keep)
    img = torch.as_tensor(ax.get_images()[0].get_array().filled(float("nan")))
    assert img.shape == (2 * 4 - 1, 3 * 4 - 1)
    assert torch.isnan(img[3]).all() and torch.isnan(img[:, 3]).all()
    assert torch.equal(img[4:7, 8:11], torch.ones(3, 3))
    assert float(img[:3].nan_to_num(0).sum()) == 0.0
    _render(ax, tmp_path / "tensor.png", min_kb=3.0)


def test_layer_sparsity_from_model_report_and_dict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = sparsify(small_cnn(), 0.8, scope="layer")
    report = sparsity_report(model)
    for source in (model, report, report.to_dict()):
        _fig, ax = plt.subplots()
        out = plot.layer_sparsity(source, ax=ax)
        assert out is ax
        widths = [p.get_width() for p in ax.patches][len(report.tensors) :]
        assert widths == pytest.approx([t.sparsity for t in report.tensors])
        _render(ax, tmp_path / "layers.png")


def test_sparsity_curve_from_schedule_and_list(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = sparsify(mlp(), 0.0)
    sched = GradualPruning(model, 0.9, start_step=0, end_step=40, every=5)
    for _ in range(50):
        sched.step()
    assert len(sched.history) >= 5
    ax = plot.sparsity_curve(sched)
    achieved = ax.get_lines()[1].get_ydata()
    assert list(achieved) == pytest.approx([h[2] for h in sorted(sched.history)])
    _render(ax, tmp_path / "curve.png")
    ax2 = plot.sparsity_curve([(0, 0.0, 0.0), (10, 0.5, 0.49), (20, 0.8, 0.8)])
    _render(ax2, tmp_path / "curve2.png")


def test_weight_histogram_counts_zeros(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = sparsify(mlp(), 0.75)
    ax = plot.weight_histogram(model)
    zero_bar = [p for p in ax.patches if p.get_facecolor()[0] > 0.7][-1]
    n_zeros = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, nn.Linear))
    assert zero_bar.get_height() == n_zeros
    _render(ax, tmp_path / "hist.png")
    _render(plot.weight_histogram(torch.randn(500)), tmp_path / "hist2.png")


def test_bad_inputs_name_the_argument() -> None:
    with pytest.raises(TypeError, match="module_or_tensor"):
        plot.mask([1, 2])
    with pytest.raises(ValueError, match="show"):
        plot.mask(torch.ones(2, 2), show="both")
    with pytest.raises(ValueError, match="name"):
        plot.mask(nn.Linear(2, 2), name="nope")
    with pytest.raises(TypeError, match="model_or_report"):
        plot.layer_sparsity(42)
    with pytest.raises(ValueError, match="history is empty"):
        plot.sparsity_curve([])
    with pytest.raises(ValueError, match="history rows"):
        plot.sparsity_curve([(1, 2)])
    with pytest.raises(ValueError, match="bins"):
        plot.weight_histogram(torch.randn(3), bins=1)
    with pytest.raises(TypeError, match="ax"):
        plot.mask(torch.ones(2, 2), ax="axes")
    lin = nn.Linear(3, 3)
    register_mask(lin)
    with pytest.raises(ValueError, match="show='weight'"):
        plot.mask(torch.ones(2, 2, dtype=torch.bool), show="weight")


def test_missing_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args: object, **kwargs: object) -> object:
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r'pip install "hadamard-sparse\[plot\]"'):
        plot.weight_histogram(torch.randn(10))


def test_importing_the_module_does_not_import_matplotlib() -> None:
    code = "import sys, hadamard_sparse.plot; sys.exit(int('matplotlib' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
