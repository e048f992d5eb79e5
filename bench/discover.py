"""Benchmark: one discover task (one checkpoint, all its domains) and where its wall time goes.

    .venv/bin/python bench/discover.py                      # demo shapes and ViT-B/16, CPU
    .venv/bin/python bench/discover.py --shapes demo --label after

Runs `circuitray.runtime.discover.discover_checkpoint` in-process (no Ray: the task's own
code) on a fresh output folder, with the functions it calls wrapped in timers. Each stage's
time is exclusive (decoding inside the outputs loop counts as decode, not as outputs):

    load            load_checkpoint
    decode+corrupt  the datasets' __getitem__ and batched __getitems__ (PNG decode, resize,
                    corruption, normalize)
    outputs fwd     model_outputs (the outputs table's forward)
    mean pass       _mean_ablation (the mean-ablation forwards, plain runs kept for reuse)
    IG steps        score_batch (EAP-IG's forward+backward passes and contractions)
    writes          write_parquet_atomic (edges, outputs, the marker)
    other           the rest: class map, preprocessing, loaders, tables

The task gets its plan from the driver, as in a job (`run_discover` plans every checkpoint
first, validating each image listing once for the whole job); planning one checkpoint is
timed apart (`plan_s`, the "plan" column) and is not part of the task's wall time.

Then the same model runs `model_outputs` and `attribute` ALONE on the very batches the task
fed them (recorded, already decoded, in a list), and

    efficiency = (outputs fwd alone + EAP-IG alone) / task wall time

which is 1 when the task costs only the model work the method needs. A Ray task runs with
`resources.torch_threads` (1 by default), so the benchmark runs at one thread unless told
otherwise and prints the count. mimalloc is LD_PRELOADed when it is found (see
bench/_mimalloc.py) or already preloaded; the JSON records which. Medians of the repeats go to
bench/results/discover_cpu.json under `--label` (other labels in the file are kept).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from _mimalloc import reexec_with_mimalloc  # bench/ is sys.path[0] when run as a script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

# demo: the demo zoo's ViT (conf/zoo-demo.yaml) and the demo job's data sizes (conf/demo.yaml)
# on 4 domains (ID, OOD, one shift, one proxy); vit_b16: ViT-B/16 on 8 images of 2 domains.
SHAPES: dict[str, dict[str, Any]] = {
    "demo": {"arch": {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 8,
                      "num_heads": 4},
             "n_per_class": 128, "ood": True,
             "overrides": ["data.limit=256", "data.attribution_limit=64", "data.batch_size=64",
                           "data.shift_kinds=[gaussian_noise]", "data.shift_severities=[3]",
                           "data.proxy_kinds=[brightness]", "data.proxy_severities=[3]"]},
    "vit_b16": {"arch": {"img_size": 224, "patch_size": 16, "embed_dim": 768, "depth": 12,
                         "num_heads": 12},
                "n_per_class": 4, "ood": False,
                "overrides": ["data.limit=8", "data.attribution_limit=8", "data.batch_size=4",
                              "data.shift_kinds=[gaussian_noise]", "data.shift_severities=[3]",
                              "data.proxy_kinds=[]"]},
}
STAGES = ("load", "decode+corrupt", "outputs fwd", "mean pass", "IG steps", "writes", "other")


def _clocks() -> tuple[float, float]:
    """(wall, this process's CPU) seconds: CPU time is what a loaded shared machine spares."""
    return time.perf_counter(), time.process_time()


class StageTimer:
    """Exclusive wall and CPU time per stage: a stage leaves out the stages timed inside it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self._children: list[list[float]] = []

    def wrap(self, stage: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = _clocks()
            self._children.append([0.0, 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                inner = self._children.pop()
                now = _clocks()
                total = (now[0] - wall, now[1] - cpu)
                self.seconds[stage] += total[0] - inner[0]
                self.cpu[stage] += total[1] - inner[1]
                if self._children:
                    self._children[-1][0] += total[0]
                    self._children[-1][1] += total[1]
        return timed


def _tee(batches: Iterable, seen: list) -> Iterator:
    for item in batches:
        seen.append(item)
        yield item


class Probe:
    """Patches the functions discover calls with timers and records what they were fed."""

    def __init__(self) -> None:
        self.timer = StageTimer()
        self.model: Any = None
        self.outputs_calls: list[tuple[list, dict]] = []
        self.attribute_calls: list[tuple[list, dict]] = []
        self._undo: list[tuple[Any, str, Any]] = []

    def _patch(self, owner: Any, name: str, new: Any) -> None:
        self._undo.append((owner, name, owner.__dict__[name] if isinstance(owner, type)
                           else getattr(owner, name)))
        setattr(owner, name, new)

    def __enter__(self) -> Probe:
        import circuitray.attribution as attribution
        import circuitray.models as models
        import circuitray.outputs as outputs
        from circuitray.data import datasets, shifts
        from circuitray.runtime import discover

        t = self.timer

        def load(*args: Any, **kwargs: Any) -> Any:
            self.model = real_load(*args, **kwargs)
            return self.model

        def model_outputs(model: Any, batches: Iterable, **kwargs: Any) -> Any:
            seen: list = []
            self.outputs_calls.append((seen, kwargs))
            return real_outputs(model, _tee(batches, seen), **kwargs)

        def attribute(model: Any, batches: Iterable, **kwargs: Any) -> Any:
            self.attribute_calls.append(([], kwargs))
            return real_attribute(model, batches, **kwargs)

        def score_batch(runner: Any, images: Any, ablated: Any, **kwargs: Any) -> Any:
            self.attribute_calls[-1][0].append((images, kwargs.get("labels")))
            return real_score(runner, images, ablated, **kwargs)

        real_load, real_outputs = models.load_checkpoint, outputs.model_outputs
        real_attribute, real_score = attribution.attribute, attribution.score_batch
        self._patch(models, "load_checkpoint", t.wrap("load", load))
        self._patch(outputs, "model_outputs", t.wrap("outputs fwd", model_outputs))
        self._patch(attribution, "attribute", t.wrap("attribute (rest)", attribute))
        self._patch(attribution, "score_batch", t.wrap("IG steps", score_batch))
        self._patch(attribution, "_mean_ablation",
                    t.wrap("mean pass", attribution._mean_ablation))
        self._patch(discover, "write_parquet_atomic",
                    t.wrap("writes", discover.write_parquet_atomic))
        for cls in (datasets._ImageDataset, shifts.ShiftedDataset):
            self._patch(cls, "__getitem__", t.wrap("decode+corrupt", cls.__dict__["__getitem__"]))
        # loaders read a batch at a time (timers are exclusive, so the per-item and
        # per-batch wraps never count the same seconds twice)
        for cls in (datasets._ImageDataset, shifts.ShiftedDataset):
            if "__getitems__" in cls.__dict__:  # (an older tree decodes base items singly)
                self._patch(cls, "__getitems__",
                            t.wrap("decode+corrupt", cls.__dict__["__getitems__"]))
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, old in reversed(self._undo):
            setattr(owner, name, old)


def _fixture(shape: str, root: Path) -> Path:
    """One random-weight checkpoint of `shape` and its data (tests/_jobdata.py)."""
    import pandas as pd
    from _jobdata import write_checkpoints

    spec = SHAPES[shape]
    manifest = write_checkpoints(root, 1, arch_kwargs=spec["arch"],
                                 n_per_class=spec["n_per_class"])
    if not spec["ood"]:
        pd.read_csv(manifest).drop(columns=["ood_domain"]).to_csv(manifest, index=False)
    return manifest


def _alone(probe: Probe) -> dict[str, float]:
    """model_outputs and attribute on the batches the task fed them, already in memory."""
    from circuitray.attribution import attribute
    from circuitray.outputs import model_outputs

    spent = defaultdict(float)
    for key, fn, calls in (("outputs", model_outputs, probe.outputs_calls),
                           ("eap_ig", attribute, probe.attribute_calls)):
        for batches, kwargs in calls:
            wall, cpu = _clocks()
            fn(probe.model, batches, **kwargs)
            now = _clocks()
            spent[f"{key}_alone_s"] += now[0] - wall
            spent[f"{key}_alone_cpu_s"] += now[1] - cpu
    return dict(spent)


def run_task(shape: str, root: Path) -> dict[str, Any]:
    """One discover task on a fresh output folder, split by stage, then the alone runs."""
    import pyarrow.parquet as pq

    from circuitray.job_config import load_job_config
    from circuitray.runtime.discover import discover_checkpoint
    from circuitray.runtime.layout import JobLayout
    from circuitray.runtime.plan import manifest_rows, plan_checkpoint

    manifest = root / "fixture" / "manifest.csv"
    out = root / "job"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_job_config(None, [f"manifest={manifest}", f"output_dir={out}",
                                 "attribution.method=eap-ig-inputs", "attribution.steps=5",
                                 "resources.torch_threads=1", *SHAPES[shape]["overrides"]])
    row = manifest_rows(cfg)[0]
    # the driver plans (run_discover: plan_job) and hands each task its plan; planning
    # validates the data's images once per listing for the whole job: timed apart
    planned = time.perf_counter()
    plan = plan_checkpoint(row, cfg, JobLayout.of(out))
    plan_s = time.perf_counter() - planned
    with Probe() as probe:
        start = _clocks()
        result = discover_checkpoint(row, cfg, plan)
        wall, cpu = (b - a for a, b in zip(start, _clocks(), strict=True))
    if result["status"] != "done":
        raise RuntimeError(f"benchmark task failed: {result}")
    import torch

    threads = torch.get_num_threads()
    splits = []
    for seconds, total in ((probe.timer.seconds, wall), (probe.timer.cpu, cpu)):
        split = dict(seconds)
        split["IG steps"] = split.get("IG steps", 0.0) + split.pop("attribute (rest)", 0.0)
        split["other"] = total - sum(split.values())
        splits.append({s: split.get(s, 0.0) for s in STAGES})
    marker = pq.read_table(JobLayout.of(out).marker(str(row["checkpoint_id"]))).to_pandas()
    alone = _alone(probe)
    reused = (int(marker["plain_runs_reused"].sum()) if "plain_runs_reused" in marker
              else None)
    return {"wall_s": wall, "cpu_s": cpu, "plan_s": plan_s, "threads": threads,
            "split_s": splits[0], "split_cpu_s": splits[1], **alone,
            "efficiency": (alone["outputs_alone_s"] + alone["eap_ig_alone_s"]) / wall,
            "cpu_efficiency": (alone["outputs_alone_cpu_s"] + alone["eap_ig_alone_cpu_s"]) / cpu,
            "domains": len(marker), "examples": int(marker["n_examples"].sum()),
            "attributed": int(marker["n_attributed"].sum()), "plain_runs_reused": reused}


def bench(shape: str, repeats: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"bench-discover-{shape}-"))
    try:
        _fixture(shape, root / "fixture")
        runs = []
        for i in range(repeats):
            runs.append(run_task(shape, root))
            r = runs[-1]
            print(f"{shape} repeat {i}: wall {r['wall_s']:.2f}s efficiency {r['efficiency']:.3f}"
                  f" (CPU {r['cpu_s']:.2f}s, {r['cpu_efficiency']:.3f}; load avg "
                  f"{os.getloadavg()[0]:.1f})", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(r[k] for r in runs)
           for k in ("wall_s", "cpu_s", "plan_s", "outputs_alone_s", "eap_ig_alone_s",
                     "efficiency", "outputs_alone_cpu_s", "eap_ig_alone_cpu_s", "cpu_efficiency")}
    split = {s: statistics.median(r["split_s"][s] for r in runs) for s in STAGES}
    split_cpu = {s: statistics.median(r["split_cpu_s"][s] for r in runs) for s in STAGES}
    return {"config": SHAPES[shape], "repeats": repeats, "threads": runs[0]["threads"],
            "domains": runs[0]["domains"], "examples": runs[0]["examples"],
            "attributed": runs[0]["attributed"],
            "plain_runs_reused": runs[0]["plain_runs_reused"], **med, "split_s": split,
            "split_cpu_s": split_cpu, "efficiency_range": [min(r["efficiency"] for r in runs),
                                                           max(r["efficiency"] for r in runs)],
            "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vit-repeats", type=int, default=1, help="repeats of vit_b16 (slow)")
    ap.add_argument("--label", default="current", help="key of this run in the JSON")
    ap.add_argument("--no-mimalloc", action="store_true")
    args = ap.parse_args()
    reexec_with_mimalloc(disabled=args.no_mimalloc)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)  # discover_checkpoint sets resources.torch_threads (1) itself
    results = {"device": "cpu", "cpu": platform.processor() or platform.machine(),
               "torch": torch.__version__, "ld_preload": os.environ.get("LD_PRELOAD"),
               "shapes": {}}
    for shape in args.shapes:
        reps = args.vit_repeats if shape == "vit_b16" else args.repeats
        results["shapes"][shape] = bench(shape, reps)
    path = REPO / "bench" / "results" / "discover_cpu.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored[args.label] = results
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stored, indent=2))
    print(f"LD_PRELOAD={results['ld_preload']}  torch {torch.__version__}  label {args.label}")
    print("one discover task, in-process; seconds (medians), exclusive per stage; "
          "the cpu rows are this process's CPU time (robust to other load)")
    print(f"{'shape':10} {'thr':>3} {'dom':>3} {'task':>7} "
          + " ".join(f"{s:>14}" for s in STAGES)
          + f" {'out alone':>9} {'IG alone':>8} {'effic.':>6} {'reused':>6} {'plan':>6}")
    for shape, r in results["shapes"].items():
        for clock, sfx, split in (("wall", "s", "split_s"), ("cpu", "cpu_s", "split_cpu_s")):
            print(f"{shape + ' ' + clock:10} {r['threads']:>3} {r['domains']:>3} "
                  f"{r['wall_s' if clock == 'wall' else 'cpu_s']:>7.2f} "
                  + " ".join(f"{r[split][s]:>14.2f}" for s in STAGES)
                  + f" {r['outputs_alone_' + sfx]:>9.2f} {r['eap_ig_alone_' + sfx]:>8.2f}"
                  f" {r['efficiency' if clock == 'wall' else 'cpu_efficiency']:>6.3f}"
                  f" {r['plain_runs_reused']!s:>6} {r['plan_s']:>6.2f}")
    for shape, r in results["shapes"].items():
        lo, hi = r["efficiency_range"]
        print(f"{shape}: efficiency over {r['repeats']} repeats {lo:.3f}-{hi:.3f}, median "
              f"{r['efficiency']:.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
