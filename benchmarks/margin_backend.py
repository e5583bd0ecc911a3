"""A margin-trained back end on frozen CAM++ embeddings (issue 10, item 6), tested on speakers it never saw.

    python benchmarks/margin_backend.py          about 1 min with accuracy_tried.py's embedding cache warm

The seed's metric learning: a projection ``x → W·x`` (192 → 192, initialised to the identity) trained with
additive-angular-margin softmax (AAM-softmax, ArcFace: Deng et al., CVPR 2019) on the telephone dev
voices' embeddings, then scored by cosine like the raw embeddings. torch is used here, at training time
only; a kept projection would ship as numpy weights.

The dev set has 18 speakers, the same in both draws, so a projection trained on them and tested on them
would only show that it learnt them. Here the speakers are split into ``FOLDS`` groups; for each group
the projection is trained on the *other* speakers' embeddings (both draws, every test-side cut: full, 3,
1 and 0.5 s, as augmentation) and tested on the group's trials only (enrolment and test speaker both in
the group; both draws), against plain cosine and cosine after centring on the training speakers' mean
(the server centres on the tenant's other voiceprints, ``verifier/score_norm.py``), on exactly the same
trials. Scores of all folds are pooled for the EER. Kept only if it beats centred cosine.

Embeddings: ``accuracy_tried.py``'s cache of the narrowband-filled front end (built on first use).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from accuracy_tried import (  # noqa: E402
    DURATIONS,
    FRONT_ENDS,
    SEEDS,
    DrawEmbeddings,
    cached,
    embed_draw,
    in_devset,
    speaker_of,
)
from common import environment  # noqa: E402
from devset import devset_dir  # noqa: E402

from verifier.embedder import Embedder, l2_normalise  # noqa: E402
from verifier.metrics import detection_errors  # noqa: E402
from verifier.models.provision import ensure_model  # noqa: E402
from verifier.models.registry import get_spec  # noqa: E402
from verifier.trials import duration_label, read_trials  # noqa: E402

OUTPUT = BENCH / "results" / "margin_backend.json"
FOLDS = 3  # 12 training speakers, 6 test speakers per fold
P_TARGET = 0.01
# AAM-softmax as usually set for speaker embeddings (e.g. the CAM++ and ECAPA recipes: m 0.2, s 30-32);
# the pull towards the identity keeps the projection close to the embedding it starts from.
MARGIN = 0.2
SCALE = 30.0
IDENTITY_PULLS = (0.0, 0.01, 0.1)
STEPS = 400
LEARNING_RATE = 1e-3
console = Console(width=150)


def train_projection(x: np.ndarray, labels: np.ndarray, identity_pull: float, seed: int) -> np.ndarray:
    """W (d × d) minimising AAM-softmax over ``labels`` of the unit embeddings ``x``, plus
    ``identity_pull``·‖W − I‖²; full-batch Adam."""
    import torch

    torch.manual_seed(seed)
    d, classes = x.shape[1], int(labels.max()) + 1
    inputs = torch.tensor(x, dtype=torch.float32)
    targets = torch.tensor(labels, dtype=torch.int64)
    weight = torch.nn.Parameter(torch.eye(d))
    centres = torch.nn.Parameter(torch.nn.functional.normalize(torch.randn(classes, d), dim=1))
    optimiser = torch.optim.Adam([weight, centres], lr=LEARNING_RATE)
    one_hot = torch.nn.functional.one_hot(targets, classes).bool()
    for _ in range(STEPS):
        projected = torch.nn.functional.normalize(inputs @ weight.T, dim=1)
        cosine = projected @ torch.nn.functional.normalize(centres, dim=1).T
        angle = torch.acos(cosine.clamp(-1 + 1e-6, 1 - 1e-6))
        logits = SCALE * torch.where(one_hot, torch.cos(angle + MARGIN), cosine)
        loss = torch.nn.functional.cross_entropy(logits, targets)
        loss = loss + identity_pull * ((weight - torch.eye(d)) ** 2).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return weight.detach().numpy().astype(np.float64)


def training_set(draws: dict[int, DrawEmbeddings], speakers: list[str]) -> tuple[np.ndarray, np.ndarray]:
    rows, labels = [], []
    index = {s: i for i, s in enumerate(speakers)}
    for draw in draws.values():
        for (path, _), (embedding, _) in sorted(
            draw.by_duration.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))
        ):
            if speaker_of(path) in index:
                rows.append(embedding)
                labels.append(index[speaker_of(path)])
    return l2_normalise(np.stack(rows)), np.array(labels)


def fold_trials(seed: int, group: set[str]) -> list[tuple[str, str, int]]:
    """The draw's trials whose enrolment and test speakers are both in ``group``."""
    trials = read_trials(devset_dir("telephone", seed) / "trials.txt")
    out = []
    for t in trials:
        enrol, test = in_devset(t.enrol), in_devset(t.test)
        if speaker_of(enrol) in group and speaker_of(test) in group:
            out.append((enrol, test, int(t.target)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads (for a cold cache)")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where to write the JSON results")
    args = parser.parse_args()
    started = time.perf_counter()
    spec = get_spec("campplus")
    frontend = next(f for f in FRONT_ENDS if f.slug == "fillw-55")
    embedder = Embedder(spec, ensure_model(spec), threads=args.threads)
    draws = {
        seed: cached(
            f"{spec.id}-{frontend.slug}-seed{seed}",
            lambda seed=seed: embed_draw(embedder, devset_dir("telephone", seed), frontend),
            False,
        )
        for seed in SEEDS
    }
    speakers = sorted({speaker_of(p) for p, _ in draws[SEEDS[0]].by_duration})
    order = [speakers[i] for i in np.random.default_rng(20261126).permutation(len(speakers))]
    groups = [set(order[i::FOLDS]) for i in range(FOLDS)]

    variants = ["cosine", "centred cosine"] + [f"AAM projection, pull {p:g}" for p in IDENTITY_PULLS]
    variants += [f"AAM projection, pull {p:g}, centred" for p in IDENTITY_PULLS]
    scores: dict[tuple[str, str], list[float]] = {}
    labels: dict[str, list[int]] = {}
    for fold, group in enumerate(groups):
        train_speakers = [s for s in speakers if s not in group]
        x, y = training_set(draws, train_speakers)
        mean = x.mean(axis=0)
        projections = {p: train_projection(x, y, p, seed=fold) for p in IDENTITY_PULLS}
        projected_means = {p: l2_normalise(x @ w.T).mean(axis=0) for p, w in projections.items()}
        for seed in SEEDS:
            draw = draws[seed]
            for enrol, test, target in fold_trials(seed, group):
                for duration in DURATIONS:
                    column = duration_label(duration)
                    e = l2_normalise(draw.by_duration[enrol, None][0])
                    t = l2_normalise(draw.by_duration[test, duration][0])
                    pairs = {
                        "cosine": (e, t),
                        "centred cosine": (l2_normalise(e - mean), l2_normalise(t - mean)),
                    }
                    for p, w in projections.items():
                        pe, pt = l2_normalise(w @ e), l2_normalise(w @ t)
                        pairs[f"AAM projection, pull {p:g}"] = (pe, pt)
                        m = projected_means[p]
                        pairs[f"AAM projection, pull {p:g}, centred"] = (
                            l2_normalise(pe - m),
                            l2_normalise(pt - m),
                        )
                    for name, (a, b) in pairs.items():
                        scores.setdefault((name, column), []).append(float(a @ b))
                    labels.setdefault(column, []).append(target)

    columns = [duration_label(d) for d in DURATIONS]
    results: dict[str, dict[str, Any]] = {}
    table = Table(
        title=f"EER % / minDCF({P_TARGET}) on speakers the projection never saw ({FOLDS} folds, both draws)"
    )
    table.add_column("back end")
    for column in columns:
        table.add_column(column, justify="right")
    for name in variants:
        results[name] = {}
        cells = []
        for column in columns:
            errors = detection_errors(np.array(scores[name, column]), np.array(labels[column]), P_TARGET)
            results[name][column] = {"eer": errors.eer, "min_dcf": errors.min_dcf}
            cells.append(f"{100 * errors.eer:.2f} / {errors.min_dcf:.3f}")
        table.add_row(name, *cells)
    console.print(table)
    counts = {c: (int(sum(labels[c])), len(labels[c]) - int(sum(labels[c]))) for c in columns}
    console.print(f"trials per column (targets, non-targets): {counts[columns[0]]}")
    console.print(f"folds: {[sorted(g) for g in groups]}")
    best = min((n for n in variants if n.startswith("AAM")), key=lambda n: results[n]["3 s"]["eer"])
    kept = results[best]["3 s"]["eer"] < results["centred cosine"]["3 s"]["eer"]
    console.print(
        f"best projection at 3 s: {best} ({100 * results[best]['3 s']['eer']:.2f} %) vs centred cosine "
        f"({100 * results['centred cosine']['3 s']['eer']:.2f} %): {'kept' if kept else 'not kept'}"
    )
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **environment(),
        "method": __doc__,
        "settings": {
            "folds": [sorted(g) for g in groups],
            "margin": MARGIN,
            "scale": SCALE,
            "identity_pulls": IDENTITY_PULLS,
            "steps": STEPS,
            "learning_rate": LEARNING_RATE,
            "p_target": P_TARGET,
        },
        "trials": counts,
        "results": results,
        "best_projection": best,
        "kept": kept,
        "elapsed_seconds": round(time.perf_counter() - started, 1),
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"took {report['elapsed_seconds']:.0f} s; wrote {args.output}")


if __name__ == "__main__":
    main()
