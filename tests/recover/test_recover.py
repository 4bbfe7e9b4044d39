"""hs.recover on tiny Hugging Face models from configs (no download): the recipe reaches its target and
beats the same run without learning, resumes bitwise, validates before changing anything, 2:4, budgets,
SentenceTransformer, logits models. The real MiniLM run is marked slow."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import hadamard_sparse as hs
from hadamard_sparse.errors import InvalidArgumentError, InvalidTypeError
from hadamard_sparse.recover import CHECKPOINT_FILE, recover
from hadamard_sparse.recover.quality import compare
from tests.hf_models import bert_config, transformers

WORDS = (
    "the a cat dog sat on mat ran fast slow red blue big small house tree river sun moon star "
    "under over near far old new green bird fish car road"
).split()


def _texts(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [
        " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (9,), generator=g)) for _ in range(n)
    ]


TRAIN = _texts(96, 0)
HELD_OUT = _texts(24, 1)  # other sentences from another seed: not the training texts


@pytest.fixture(scope="module")
def tok() -> object:
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    return transformers.BertTokenizerFast(vocab=vocab)


def _config(tok: object, **kw: object) -> object:
    return bert_config(
        vocab_size=tok.vocab_size,  # type: ignore[attr-defined]
        initializer_range=0.2,  # large weights: pruning them changes the output
        **kw,
    )


def _bert(tok: object) -> nn.Module:
    torch.manual_seed(0)
    return transformers.BertModel(_config(tok))


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


KW = {"batch_size": 16, "calibration_batches": 2, "progress": False, "pruning_steps": 4, "method": "wanda"}


def test_recover_reaches_the_target_and_beats_pruning_without_learning(tok: object) -> None:
    model = _bert(tok)
    dense = copy.deepcopy(model)
    report = recover(model, TRAIN, 0.9, tokenizer=tok, eval_data=HELD_OUT, steps=40, lr=3e-3, **KW)
    assert report.model is model and report.steps == 40 and not report.stopped_early
    assert not report.cut_to_target and not report.shortened
    assert report.sparsity == pytest.approx(0.9, abs=2e-3)
    # heads stay dense, every encoder Linear is pruned; the one-shot went to 0.7 first
    masks = hs.masks(model)
    assert "pooler.dense.weight" not in masks and len(masks) == 12
    assert report.plan.initial == 0.7 and report.plan.target == 0.9 and report.plan.every > 0
    # the same plan without learning (lr ~ 0): pure one-shot + gradual magnitude pruning
    frozen = copy.deepcopy(dense)
    ref = recover(frozen, TRAIN, 0.9, tokenizer=tok, eval_data=HELD_OUT, steps=40, lr=1e-30, **KW)
    assert ref.sparsity == pytest.approx(0.9, abs=2e-3)
    assert report.quality is not None and ref.quality is not None
    assert report.quality.cosine > ref.quality.cosine + 0.02, (report.quality, ref.quality)
    # the report's quality is the cosine of the two models' mean-pooled embeddings, recomputed here
    batch = dict(tok(HELD_OUT, padding=True, return_tensors="pt"))  # type: ignore[operator]

    def pooled(m: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            h = m.eval()(**batch).last_hidden_state
        w = batch["attention_mask"].unsqueeze(-1).float()
        return (h * w).sum(1) / w.sum(1)

    want = torch.nn.functional.cosine_similarity(pooled(model), pooled(dense), dim=-1).mean()
    assert report.quality.cosine == pytest.approx(float(want), abs=1e-5)
    print(report)


@pytest.mark.parametrize("ramp", ["magnitude", "movement"])
def test_resume_is_bitwise_the_uninterrupted_run(ramp: str, tok: object, tmp_path: Path) -> None:
    kw = dict(
        tokenizer=tok, steps=12, checkpoint_every=4, dropout=True, lr=1e-3, seed=3, ramp_method=ramp, **KW
    )
    if ramp == "movement":
        kw["scope"] = "layer"
    whole = _bert(tok)
    full = recover(whole, TRAIN, 0.8, checkpoint_dir=tmp_path / "a", **kw)

    def interrupt(step: int, info: dict[str, float]) -> None:
        if step == 8:
            raise KeyboardInterrupt

    cut = _bert(tok)
    with pytest.raises(KeyboardInterrupt):
        recover(cut, TRAIN, 0.8, checkpoint_dir=tmp_path / "b", callback=interrupt, **kw)
    assert torch.load(tmp_path / "b" / CHECKPOINT_FILE, weights_only=True)["step"] == 8
    torch.manual_seed(1234)  # whatever the process did in between
    resumed = _bert(tok)  # the same dense model again
    rest = recover(resumed, TRAIN, 0.8, checkpoint_dir=tmp_path / "b", resume=True, **kw)
    assert rest.steps == 12 and rest.losses == full.losses
    assert _same_state(resumed, whole)
    assert hs.masks(resumed).keys() == hs.masks(whole).keys()
    # another configuration refuses the checkpoint, before any change
    other = _bert(tok)
    before = copy.deepcopy(other)
    with pytest.raises(InvalidArgumentError, match="other arguments"):
        recover(other, TRAIN, 0.8, checkpoint_dir=tmp_path / "b", resume=True, **{**kw, "lr": 2e-3})
    # batches drawn the other way (a checkpoint from before length grouping reads as saved None)
    with pytest.raises(InvalidArgumentError, match="group_by_length: saved True, now False"):
        recover(other, TRAIN, 0.8, checkpoint_dir=tmp_path / "b", resume=True, group_by_length=False, **kw)
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        recover(other, TRAIN, 0.8, checkpoint_dir=tmp_path / "none", resume=True, **kw)
    assert _same_state(other, before)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sparsity": 1.0}, InvalidArgumentError, r"sparsity must be a float in \(0, 1\)"),
        ({"sparsity": 0.0}, InvalidArgumentError, r"sparsity must be a float in \(0, 1\)"),
        ({"sparsity": 1.5}, InvalidArgumentError, "sparsity"),
        ({"data": []}, InvalidArgumentError, "data is empty"),
        ({"data": "one string"}, InvalidTypeError, "data must be an iterable"),
        ({"eval_data": []}, InvalidArgumentError, "eval_data is empty"),
        ({"method": "nope"}, InvalidArgumentError, "nope"),
        ({"ramp_method": "wanda"}, InvalidArgumentError, "wanda"),
        ({"tokenizer": None}, InvalidArgumentError, "tokenizer="),
        ({"exclude": "encoder.layr.*"}, InvalidArgumentError, "encoder.layr"),
        ({"max_minutes": 0}, InvalidArgumentError, "max_minutes"),
        ({"lr": -1.0}, InvalidArgumentError, "lr must be"),
        ({"structure": "2:4", "sparsity": 0.9}, InvalidArgumentError, "at most 0.5"),
        ({"resume": True}, InvalidArgumentError, "checkpoint_dir"),
        ({"group_by_length": 1}, InvalidTypeError, "group_by_length must be a bool"),
    ],
)
def test_bad_arguments_raise_before_any_change(tok: object, kwargs: dict, error: type, match: str) -> None:
    model = _bert(tok)
    before = copy.deepcopy(model)
    args = {"data": TRAIN, "sparsity": 0.9, "tokenizer": tok, **KW, **kwargs}
    data, sparsity = args.pop("data"), args.pop("sparsity")
    with pytest.raises(error, match=match):
        recover(model, data, sparsity, **args)
    assert _same_state(model, before) and not hs.masks(model)


def test_two_four_keeps_the_pattern_and_inputs_as_batches(tok: object) -> None:
    model = _bert(tok)
    batches = [dict(tok(TRAIN[i : i + 16], padding=True, return_tensors="pt")) for i in range(0, 96, 16)]  # type: ignore[operator]
    report = recover(model, batches, structure="2:4", steps=8, **KW)
    assert report.sparsity == 0.5 and report.plan.every == 0
    for name, m in hs.masks(model).items():
        groups = m.reshape(m.shape[0], -1, 4)
        assert bool((groups.sum(-1) == 2).all()), name


def test_budget_shortens_the_run_and_still_reaches_the_target(tok: object) -> None:
    model = _bert(tok)
    report = recover(
        model, TRAIN, 0.9, tokenizer=tok, steps=100_000, max_minutes=0.05, **{**KW, "method": "magnitude"}
    )
    assert report.planned_steps < 100_000 and report.minutes < 0.5 and report.shortened
    assert report.sparsity == pytest.approx(0.9, abs=2e-3)


def test_logits_model_distils_logits_and_keeps_the_classifier_dense(tok: object) -> None:
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(_config(tok, num_labels=3))
    dense = copy.deepcopy(model).eval()
    report = recover(model, TRAIN, 0.8, tokenizer=tok, eval_data=HELD_OUT, steps=20, lr=1e-3, **KW)
    assert "classifier.weight" not in hs.masks(model) and "bert.pooler.dense.weight" not in hs.masks(model)
    batch = dict(tok(HELD_OUT, padding=True, return_tensors="pt"))  # type: ignore[operator]
    with torch.no_grad():
        want = compare(dense(**batch).logits, model.eval()(**batch).logits)
    assert report.quality is not None and report.quality.cosine == pytest.approx(want.cosine, abs=1e-5)


def test_sentence_transformer_brings_its_tokenizer(tok: object, tmp_path: Path) -> None:
    st = pytest.importorskip("sentence_transformers")
    _bert(tok).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")  # type: ignore[attr-defined]
    model = st.SentenceTransformer(str(tmp_path / "m"), device="cpu")  # Transformer + mean pooling
    dense = copy.deepcopy(model)
    report = recover(
        model, TRAIN, 0.8, eval_data=HELD_OUT, steps=10, lr=1e-3, **{**KW, "method": "sparsegpt_block"}
    )
    assert report.sparsity == pytest.approx(0.8, abs=2e-3)
    a = torch.as_tensor(model.encode(HELD_OUT, convert_to_tensor=True))
    b = torch.as_tensor(dense.encode(HELD_OUT, convert_to_tensor=True))
    assert report.quality is not None
    assert report.quality.cosine == pytest.approx(float(torch.cosine_similarity(a, b).mean()), abs=1e-4)


def test_quality_against_hand_computed_neighbours() -> None:
    t = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 0.9], [0.9, 0.1]])
    q = compare(t, s)
    # neighbours (k=3 covers everything): top-1 teacher [1, 0, 3, 2], student [3, 2, 1, 0]
    assert q.top1 == 0.0 and q.top10 == 1.0 and q.n == 4
    assert q.cosine == pytest.approx(float(torch.cosine_similarity(t, s).mean()))


@pytest.mark.slow
def test_minilm_distillation_beats_its_one_shot_start() -> None:
    st = pytest.importorskip("sentence_transformers")
    from tests.conftest import minilm_path

    model = st.SentenceTransformer(minilm_path(), device="cpu")
    train = [
        f"The {a} {b} near the {c} every {d}."
        for a in ("old", "quiet", "busy", "small")
        for b in ("shop opens", "train stops", "bird sings", "team trains")
        for c in ("river", "station", "market", "school")
        for d in ("morning", "evening")
    ]
    held = [
        "Interest rates were left unchanged by the central bank.",
        "The orchestra rehearsed the symphony late into the night.",
        "Researchers sequenced the genome of an ancient wheat variety.",
        "My phone battery drains faster since the last update.",
        "Heavy snowfall closed the mountain pass for a week.",
        "The jury deliberated for three days before reaching a verdict.",
    ]
    report = recover(model, train, 0.7, eval_data=held, steps=40, method="wanda", lr=1e-4, progress=False)
    assert report.sparsity == pytest.approx(0.7, abs=1e-2) and report.one_shot is not None
    assert report.quality is not None and report.quality.cosine > report.one_shot.cosine + 0.02, report
