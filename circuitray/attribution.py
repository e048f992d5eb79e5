"""EAP and EAP-IG edge scores for a timm ViT over a stream of image batches (DESIGN §2).

score(u→v) = mean_x Σ_positions (ã_u − a_u(x)) · mean_k ∂M/∂in_v |run k. Δ = ã − a is fixed
across IG steps, so each step costs one forward+backward of the real timm model plus a
contraction: gradients are read once at every q/k/v and MLP read point (the model's family
adapter pushes the per-head q/k/v gradients through W_qkv and the block norm analytically, so
no destination needs its own backward pass), and all scores of a block are one matmul
Δ[prefix, N·T·D] @ G[N·T·D, dst]. This module never touches a model's modules itself: what a
model family decides lives in `circuitray.families`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import nn

from circuitray.errors import ConfigError, InputError, TableError
from circuitray.families import FamilyAdapter, adapter_for
from circuitray.graph import ViTGraph
from circuitray.tables import EDGE_SCHEMA, conform
from circuitray.torch_utils import eval_mode, split_batch

# The allowed values of `attribute`'s options, defined once: the job config validates
# against these too (circuitray.job_config.check_job_config).
METHODS = ("eap", "eap-ig-inputs")
DATASET_ABLATIONS = ("mean-positional", "mean", "zero")  # need nothing beyond the dataset
ABLATIONS = (*DATASET_ABLATIONS, "corrupted")  # corrupted: needs `corrupted_batches`
METRICS = ("kl", "logit", "ce")
DTYPES = ("fp32", "bf16", "fp64")
# Memory for EAP-IG's per-destination gradients summed over the IG points, in the family's
# factored form (see score_batch): every block of the small configs and of ViT-B/16 at
# batch 4 (about 22 MiB a block at five points).
IG_SUM_BYTES = 512 * 2**20


# -- results ----------------------------------------------------------------------------
@dataclass
class EdgeScores:
    """Signed edge scores in the graph's dense [n_src, n_dst] layout (0 where no edge)."""

    graph: ViTGraph
    scores: np.ndarray
    n_examples: int
    method: str
    steps: int | None = None
    ablation: str | None = None
    metric: str | None = None
    example_norms: np.ndarray | None = field(default=None, repr=False)
    # batches whose plain forward the scoring pass took from the mean pass (a job records it:
    # 0 where every batch had to be run again)
    plain_runs_reused: int = 0

    def to_table(self, task: str, checkpoint: str, domain: str) -> pa.Table:
        """One row per existing edge, src-major forward order, conforming to EDGE_SCHEMA."""
        edges = self.graph.edges()
        n = len(edges)
        cols = {
            "task": [task] * n, "checkpoint": [checkpoint] * n, "domain": [domain] * n,
            "method": [self.method] * n,
            "src": edges["src"].to_numpy(), "dst": edges["dst"].to_numpy(),
            "src_depth": edges["src_depth"].to_numpy(np.int16),
            "dst_depth": edges["dst_depth"].to_numpy(np.int16),
            "score": self.scores[edges["src_index"], edges["dst_index"]].astype(np.float32),
            "n_examples": np.full(n, self.n_examples, dtype=np.int64),
        }
        return conform(pa.table(cols), EDGE_SCHEMA, f"edges of {checkpoint}/{domain}")

    @classmethod
    def from_table(cls, table: pa.Table | pd.DataFrame,
                   graph: ViTGraph | None = None) -> EdgeScores:
        """Inverse of `to_table` for one (task, checkpoint, domain, method) slice."""
        df = table.to_pandas() if isinstance(table, pa.Table) else table
        missing = [c for c in EDGE_SCHEMA.names if c not in df.columns]
        if missing:
            raise TableError(f"edge table: missing column(s) {missing}")
        keys = df[["task", "checkpoint", "domain", "method"]].drop_duplicates()
        if len(keys) != 1:
            raise TableError(f"edge table holds {len(keys)} circuits; select one "
                             f"(task, checkpoint, domain, method) first")
        if graph is None:
            graph = ViTGraph.from_names(sorted(set(df["src"])), sorted(set(df["dst"])))
        s = df["src"].map({n: i for i, n in enumerate(graph.src_names)})
        d = df["dst"].map({n: i for i, n in enumerate(graph.dst_names)})
        if s.isna().any() or d.isna().any():
            raise TableError("edge table: node names not in the given graph")
        s, d = s.to_numpy(int), d.to_numpy(int)
        if not graph.edge_mask()[s, d].all():
            raise TableError("edge table: rows that are not edges of the graph")
        if len(set(zip(s, d, strict=True))) != len(df):
            raise TableError("edge table: duplicate edges")
        scores = np.zeros((graph.n_src, graph.n_dst))
        scores[s, d] = df["score"].to_numpy(np.float64)
        return cls(graph, scores, int(df["n_examples"].iloc[0]), str(df["method"].iloc[0]))

    def top_edges(self, n: int, absolute: bool = True) -> pd.DataFrame:
        """The n strongest edges (by |score| or signed score), strongest first."""
        edges = self.graph.edges()
        edges["score"] = self.scores[edges["src_index"], edges["dst_index"]]
        key = edges["score"].abs() if absolute else edges["score"]
        order = np.argsort(-key.to_numpy(), kind="stable")[:n]
        return edges.iloc[order].reset_index(drop=True)


# -- metric -----------------------------------------------------------------------------
def metric_per_example(logits: torch.Tensor, clean_logits: torch.Tensor,
                       labels: torch.Tensor | None, metric: str) -> torch.Tensor:
    """M per example: KL(p_clean ‖ p_run), the clean top class's logit, or CE with labels."""
    if metric == "kl":
        logp_clean = clean_logits.log_softmax(-1)
        return (logp_clean.exp() * (logp_clean - logits.log_softmax(-1))).sum(-1)
    if metric == "logit":
        return logits.gather(-1, clean_logits.argmax(-1, keepdim=True)).squeeze(-1)
    if metric == "ce":
        if labels is None:
            raise InputError("metric 'ce' needs labels")
        return nn.functional.cross_entropy(logits, labels, reduction="none")
    raise ConfigError(f"metric: unknown {metric!r}; choose one of {METRICS}")


# -- batches and ablations --------------------------------------------------------------
def _labels_for(metric: str, labels: torch.Tensor | None, n: int, where: str,
                device: torch.device) -> torch.Tensor | None:
    if metric != "ce":
        return None
    if labels is None or (labels < 0).any():
        raise InputError(f"{where}: metric 'ce' needs labels, and this batch has "
                         f"{'none' if labels is None else 'unlabeled (-1) examples'}")
    if labels.shape != (n,):
        raise InputError(f"{where}: labels of shape {tuple(labels.shape)} for {n} images")
    return labels.to(device=device, dtype=torch.long)


class _Runner:
    """Holds a model prepared for attribution: device, dtype, autocast, frozen parameters."""

    def __init__(self, adapter: FamilyAdapter, device: torch.device, dtype: str):
        self.adapter, self.device = adapter, device
        p = next(adapter.model.parameters())
        self.param_dtype = p.dtype
        self.work = torch.float64 if p.dtype == torch.float64 else torch.float32
        self.bf16 = dtype == "bf16"

    def autocast(self) -> AbstractContextManager:
        if not self.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def images(self, images: torch.Tensor, where: str) -> torch.Tensor:
        self.adapter.check_images(images, where)
        return images.to(self.device, dtype=self.param_dtype)

    @torch.no_grad()
    def sources(self, images: torch.Tensor, where: str, cached: CleanRun | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Node values [n_src, N, T, D] (work dtype) and logits of a plain run.

        `cached` is the same run recorded earlier (by the mean pass), which saves a forward.
        """
        ad = self.adapter
        if cached is None:
            with ad.instrument() as rec, self.autocast():
                logits = ad.model(images)
            cached = CleanRun(images, rec.input, list(rec.z), list(rec.mlp), logits)
        a = ad.expand_sources(cached.input.to(self.work), [z.to(self.work) for z in cached.z],
                              [m.to(self.work) for m in cached.mlp])
        logits = cached.logits
        logits = logits.to(self.work)
        ad.check_finite(a, logits, where)
        return a, logits


@dataclass
class CleanRun:
    """What one plain forward recorded: the images, the raw node parts and the logits."""

    images: torch.Tensor
    input: torch.Tensor
    z: list[torch.Tensor]
    mlp: list[torch.Tensor]
    logits: torch.Tensor

    @property
    def nbytes(self) -> int:
        parts = [self.images, self.input, *self.z, *self.mlp, self.logits]
        return sum(t.numel() * t.element_size() for t in parts)

    def matches(self, images: torch.Tensor) -> bool:
        """Whether this run was of `images` (a loader may give other images on a later pass)."""
        return self.images.shape == images.shape and torch.equal(self.images, images)


def score_batch(runner: _Runner, images: torch.Tensor, ablated: torch.Tensor, *,
                alphas: Sequence[float], metric: str, labels: torch.Tensor | None = None,
                per_example: bool = False, where: str = "batch",
                clean_run: CleanRun | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scores of one batch, SUMMED over its examples and AVERAGED over the IG points `alphas`.

    `ablated` is ã [n_src, N|1, T|1, D]. Returns float64 [n_src, n_dst] and, when
    `per_example`, float64 [N, n_src, n_dst]. The run of point α has the `input` node
    e' + α(e − e'); α = 0 is the fully ablated input (EAP's point). `clean_run`, when given,
    is this batch's plain run recorded before, so it is not computed again.
    """
    ad, g = runner.adapter, runner.adapter.graph
    H, D = ad.n_heads, ad.dim
    if clean_run is not None and not clean_run.matches(images):
        clean_run = None  # the loader gave other images this time: run them afresh
    clean, clean_logits = runner.sources(images, where, clean_run)
    del clean_run  # its raw parts are in `clean` now; keep one copy at the peak
    N, T = clean.shape[1], clean.shape[2]
    ablated = ablated.to(runner.work).expand(g.n_src, N, T, D)
    e_abl, e_clean = ablated[0], clean[0].clone()
    delta = clean.neg_().add_(ablated).view(g.n_src, N, T * D)  # ã − a, in place: one copy
    del clean
    total = torch.zeros(g.n_src, g.n_dst, dtype=torch.float64, device=runner.device)
    per = (torch.zeros(N, g.n_src, g.n_dst, dtype=torch.float64, device=runner.device)
           if per_example else None)

    def add(rows: int, cols: slice, grads: torch.Tensor) -> None:
        """Δ[:rows] · G over positions/features, for destinations `cols`: grads [v, N, T, D]."""
        gv = grads.to(runner.work).reshape(grads.shape[0], N, T * D)
        if per is None:
            part = delta[:rows].reshape(rows, -1) @ gv.reshape(gv.shape[0], -1).T
            total[:rows, cols] += part.double() / len(alphas)
        else:
            part = torch.einsum("pnx,vnx->npv", delta[:rows], gv).double() / len(alphas)
            per[:, :rows, cols] += part
            total[:rows, cols] += part.sum(0)

    # Δ is the same at every IG point, so Σ_k Δ·G_k = Δ·(Σ_k G_k): for the last blocks (and
    # the logits) the points' gradients are kept in the family's factored form (the q/k/v
    # factor summed, the per-point parts stacked), turned into gradients and contracted
    # once per batch; earlier blocks, past IG_SUM_BYTES, are contracted point by point.
    # Building the per-head gradients was the largest cost above the passes themselves.
    L, n_dst, K = ad.n_blocks, g.n_dst, len(alphas)
    elt = delta.element_size()
    layer_bytes = (K + 4) * N * T * D * elt  # Σgr (3 residuals), K x̂, the MLP's sum
    l0 = L  # blocks from l0 on are summed
    if K > 1 and IG_SUM_BYTES >= N * T * D * elt:
        l0 = L - min(L, (IG_SUM_BYTES - N * T * D * elt) // layer_bytes)
    gr_sum: dict[int, torch.Tensor] = {}
    ms: dict[int, list[torch.Tensor]] = {layer: [] for layer in range(l0, L)}
    xhs: dict[int, list[torch.Tensor]] = {layer: [] for layer in range(l0, L)}
    mlp_sum: dict[int, torch.Tensor] = {}
    logits_sum = None

    for alpha in alphas:
        e_k = (e_abl + alpha * (e_clean - e_abl)).to(runner.param_dtype).requires_grad_(True)
        with torch.enable_grad(), ad.instrument(input_override=e_k) as rec:
            with runner.autocast():
                logits = ad.model(images)
            m = metric_per_example(logits.to(runner.work), clean_logits, labels, metric).sum()
            grads = torch.autograd.grad(m, rec.read_points())
        for layer in range(L):
            cols = g.block_dst_slice(layer)
            p = g.n_sources_of(cols.start)
            f = ad.head_read_factors(rec, grads, layer, runner.work)
            g_m = ad.mlp_read_grad(rec, grads, layer, runner.work)
            if layer < l0:
                heads = ad.head_read_grads(layer, f.gr, f.m.unsqueeze(0), f.xh.unsqueeze(0))
                add(p, slice(cols.start, cols.stop - 1), heads)
                add(p + H, slice(cols.stop - 1, cols.stop), g_m.unsqueeze(0))
                del heads
            else:
                gr_sum[layer] = f.gr if layer not in gr_sum else gr_sum[layer].add_(f.gr)
                ms[layer].append(f.m)
                xhs[layer].append(f.xh)
                mlp_sum[layer] = g_m if layer not in mlp_sum else mlp_sum[layer].add_(g_m)
            del f, g_m
        g_out = ad.logits_read_grad(rec, grads).to(runner.work)
        if l0 < L:
            logits_sum = g_out if logits_sum is None else logits_sum.add_(g_out)
        else:
            add(g.n_src, slice(n_dst - 1, n_dst), g_out.unsqueeze(0))
        del grads, rec, g_out
    for layer in range(l0, L):  # the summed destinations, contracted once
        cols = g.block_dst_slice(layer)
        p = g.n_sources_of(cols.start)
        heads = ad.head_read_grads(layer, gr_sum.pop(layer), torch.stack(ms.pop(layer)),
                                   torch.stack(xhs.pop(layer)))
        add(p, slice(cols.start, cols.stop - 1), heads)
        del heads
        add(p + H, slice(cols.stop - 1, cols.stop), mlp_sum.pop(layer).unsqueeze(0))
    if logits_sum is not None:
        add(g.n_src, slice(n_dst - 1, n_dst), logits_sum.unsqueeze(0))
    return total, per


def _mean_ablation(runner: _Runner, batches: Iterable, kind: str, cache_bytes: int = 0
                   ) -> tuple[torch.Tensor, int, dict[int, CleanRun]]:
    """First pass: per-position (or overall) mean of every node over the WHOLE dataset.

    The plain runs of the first batches, up to `cache_bytes`, are kept: the scoring pass
    reuses them instead of running the same forward again (one forward per batch saved).
    """
    ad, sums, n = runner.adapter, None, 0
    cache: dict[int, CleanRun] = {}
    cached_bytes = 0
    for i, item in enumerate(batches):
        images, _ = split_batch(item, f"batch {i}")
        images = runner.images(images, f"batch {i}")
        with torch.no_grad(), ad.instrument() as rec, runner.autocast():
            logits = ad.model(images)
        parts = [rec.input, *rec.z, *rec.mlp]
        parts = [t.to(runner.work).sum(0) for t in parts]
        if not torch.isfinite(logits).all():
            a = ad.expand_sources(rec.input, rec.z, rec.mlp)
            ad.check_finite(a.to(runner.work), logits, f"batch {i}")
        run = CleanRun(images, rec.input, list(rec.z), list(rec.mlp), logits)
        if cached_bytes + run.nbytes <= cache_bytes:
            cache[i] = run
            cached_bytes += run.nbytes
        sums = parts if sums is None else [s + t for s, t in zip(sums, parts, strict=True)]
        n += images.shape[0]
    if sums is None:
        raise InputError("batches: the dataset is empty")
    L = ad.n_blocks
    means = [s / n for s in sums]
    abl = ad.expand_sources(means[0], means[1:1 + L], means[1 + L:])  # [n_src, T, D]
    if kind == "mean":
        abl = abl.mean(1, keepdim=True)
    return abl.unsqueeze(1), n, cache  # ã: [n_src, 1, T|1, D]


def _device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_ablation(model: nn.Module, batches: Iterable, ablation: str = "mean-positional",
                     *, device: str | torch.device | None = None) -> torch.Tensor:
    """ã for every source, [n_src, 1, T|1, D], for the dataset-level ablations.

    'mean-positional' / 'mean' read the whole dataset; 'zero' reads nothing. For
    'corrupted', use `node_values` on each corrupted batch instead.
    """
    adapter = adapter_for(model)
    runner = _Runner(adapter, _device(device), "fp32")
    if ablation == "zero":
        return torch.zeros(adapter.graph.n_src, 1, 1, adapter.dim, dtype=runner.work,
                           device=runner.device)
    if ablation not in DATASET_ABLATIONS:
        raise ConfigError(f"ablation: {ablation!r} has no dataset-level value; "
                          f"choose one of {DATASET_ABLATIONS}")
    with eval_mode(model.to(runner.device)):
        return _mean_ablation(runner, batches, ablation)[0]


def node_values(model: nn.Module, images: torch.Tensor,
                *, device: str | torch.device | None = None) -> torch.Tensor:
    """Every source node's value on `images`: [n_src, N, T, D] (the 'corrupted' ablation)."""
    runner = _Runner(adapter_for(model), _device(device), "fp32")
    with eval_mode(model.to(runner.device)):
        return runner.sources(runner.images(images, "images"), "images")[0]


def _cast_floats(model: nn.Module, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.dtype]]:
    """Cast the model's floating parameters and buffers in place; returns what to restore.

    In place (`.data`), so the Parameter objects a caller (or its optimizer) holds stay
    valid; casting back from float64 is exact for every floating dtype.
    """
    saved = []
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point() and t.dtype != dtype:
            saved.append((t, t.dtype))
            t.data = t.data.to(dtype)
    return saved


def _restore_dtypes(saved: list[tuple[torch.Tensor, torch.dtype]]) -> None:
    for t, dtype in saved:
        t.data = t.data.to(dtype)


def attribute(model: nn.Module, batches: Iterable, *, method: str = "eap-ig-inputs",
              ablation: str = "mean-positional", metric: str = "kl", steps: int = 5,
              device: str | torch.device | None = None, dtype: str = "fp32",
              corrupted_batches: Iterable | None = None, per_example_norms: bool = False,
              progress: Callable[[int, int | None], None] | None = None,
              cache_bytes: int = 256 * 2**20) -> EdgeScores:
    """Score every edge of `model`'s graph on a dataset streamed as `batches` (DESIGN §2).

    `batches` is re-iterable (it is read twice for mean ablations); its items are images
    [B, 3, H, W] or (images, labels, ...). The model is moved to `device` (default: CUDA if
    available), put in eval mode with frozen parameters, and restored afterwards (mode and
    requires_grad; not the device). `dtype="fp32"` runs in the model's own precision,
    "bf16" under autocast with fp32 accumulation, "fp64" casts the model and the images to
    float64 for the run (an oracle's precision; the model's dtypes are restored after).
    Mean ablations keep up to `cache_bytes` of the first pass's plain runs and reuse them
    for batches whose images are unchanged on the second pass (a shuffling loader simply
    gets no reuse; `make_loader(..., fixed_order=True)` or a list always does); 0 turns
    this off. The result's `plain_runs_reused` says how many batches reused one.
    """
    for key, val, allowed in (("method", method, METHODS), ("ablation", ablation, ABLATIONS),
                              ("metric", metric, METRICS), ("dtype", dtype, DTYPES)):
        if val not in allowed:
            raise ConfigError(f"{key}: unknown {val!r}; choose one of {allowed}")
    if method == "eap-ig-inputs" and (not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"steps: must be a positive integer, got {steps!r}")
    if (ablation == "corrupted") != (corrupted_batches is not None):
        raise ConfigError("corrupted_batches: required exactly when ablation='corrupted'")
    adapter = adapter_for(model)
    dev = _device(device)
    alphas = [0.0] if method == "eap" else [k / steps for k in range(steps)]
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    model.to(dev).eval().requires_grad_(False)
    cast: list[tuple[torch.Tensor, torch.dtype]] = []
    try:
        if dtype == "fp64":
            cast = _cast_floats(model, torch.float64)
        runner = _Runner(adapter, dev, dtype)
        g = adapter.graph
        total_n, cache = None, {}
        if ablation in ("mean-positional", "mean"):
            abl_all, total_n, cache = _mean_ablation(runner, batches, ablation, cache_bytes)
        zero = torch.zeros(g.n_src, 1, 1, adapter.dim, dtype=runner.work, device=dev)
        corrupted = iter(corrupted_batches) if corrupted_batches is not None else None
        total = torch.zeros(g.n_src, g.n_dst, dtype=torch.float64, device=dev)
        norms, n, reused = [], 0, 0
        edge_mask = torch.as_tensor(g.edge_mask(), device=dev)
        for i, item in enumerate(batches):
            where = f"batch {i}"
            images, labels = split_batch(item, where)
            images = runner.images(images, where)
            labels = _labels_for(metric, labels, images.shape[0], where, dev)
            if ablation == "corrupted":
                try:
                    c_images, _ = split_batch(next(corrupted), f"corrupted {where}")
                except StopIteration:
                    raise InputError(f"corrupted_batches: ended before {where}") from None
                c_images = runner.images(c_images, f"corrupted {where}")
                if c_images.shape != images.shape:
                    raise InputError(f"corrupted {where}: shape {tuple(c_images.shape)} "
                                     f"differs from the clean batch {tuple(images.shape)}")
                abl, _ = runner.sources(c_images, f"corrupted {where}")
            else:
                abl = zero if ablation == "zero" else abl_all
            if i in cache and not cache[i].matches(images):
                del cache[i]  # the loader gave other images this time
            reused += i in cache
            # popped into the call: score_batch drops its raw parts early (one copy at peak)
            part, per = score_batch(runner, images, abl, alphas=alphas, metric=metric,
                                    labels=labels, per_example=per_example_norms, where=where,
                                    clean_run=cache.pop(i, None))
            total += part
            if per is not None:
                norms.append((per * edge_mask).flatten(1).norm(dim=1).cpu().numpy())
            n += images.shape[0]
            if progress is not None:
                progress(n, total_n)
        if n == 0:
            raise InputError("batches: the dataset is empty")
    finally:
        _restore_dtypes(cast)
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)
    scores = (total / n).cpu().numpy()
    scores[~g.edge_mask()] = 0.0
    return EdgeScores(g, scores, n, method, steps=len(alphas), ablation=ablation, metric=metric,
                      example_norms=np.concatenate(norms) if norms else None,
                      plain_runs_reused=reused)
