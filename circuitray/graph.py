"""The computation graph of a pre-norm ViT: nodes, edges, depths and the dense score layout.

Scores live in one dense `[n_src, n_dst]` matrix in forward order (DESIGN §1), so the
sources of any destination are a prefix of the rows; names, depths and edges are views
onto that layout. This module is torch-free and never touches a model, so the metrics and
plotting layers can rebuild a graph from an edge table; the graph of a model comes from its
family adapter (`circuitray.families.graph_of`). The node-name helpers below are the only
code that parses node names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from circuitray.errors import TableError

QKV = ("q", "k", "v")
# a{l}.h{h}, a{l}.h{h}<q|k|v> and m{l}: every node name except `input` and `logits`
_BLOCK_NODE = re.compile(r"^(?:a(\d+)\.h(\d+)(?:<[qkv]>)?|m(\d+))$")


def _parse(name: str) -> tuple[int, int | None]:
    """(block, head or None) of a block node name; TableError names anything else."""
    m = _BLOCK_NODE.match(name)
    if m is None:
        raise TableError(f"node name {name!r} is not input, logits, a<l>.h<h>[<q|k|v>] "
                         f"or m<l>")
    if m.group(3) is not None:
        return int(m.group(3)), None
    return int(m.group(1)), int(m.group(2))


def node_of(name: str) -> str:
    """Node a source or destination name belongs to: 'a3.h1<q>' -> 'a3.h1' (q/k/v to the head)."""
    return name.split("<", 1)[0]


def node_block(name: str) -> int | None:
    """Block index of a node name ('a3.h1<q>' and 'm3' -> 3); None for input and logits."""
    if name in ("input", "logits"):
        return None
    return _parse(name)[0]


def node_head(name: str) -> int | None:
    """Head index of an attention node name ('a3.h1<q>' -> 1); None for MLP, input, logits."""
    if name in ("input", "logits"):
        return None
    return _parse(name)[1]


def node_depth(name: str, n_blocks: int) -> int:
    """Depth of DESIGN §1: input 0, any node of block l is l + 1, logits L + 1."""
    if name == "input":
        return 0
    if name == "logits":
        return int(n_blocks) + 1
    return _parse(name)[0] + 1


def edge_count(n_blocks: int, n_heads: int) -> int:
    """E = 3H·[L + (H+1)L(L−1)/2] + (H+1)L(L+1)/2 + 1 + L(H+1)  (DESIGN §1)."""
    L, H = int(n_blocks), int(n_heads)
    return (3 * H * (L + (H + 1) * L * (L - 1) // 2)
            + (H + 1) * L * (L + 1) // 2 + 1 + L * (H + 1))


@dataclass(frozen=True, eq=False)
class ViTGraph:
    """Nodes of an L-block, H-head ViT in forward order; which (src, dst) pairs are edges.

    Two graphs are equal when their shapes are (the model name is a label, not structure).
    """

    n_blocks: int
    n_heads: int
    model_name: str = "vit"
    src_names: list[str] = field(init=False)
    dst_names: list[str] = field(init=False)
    src_depth: np.ndarray = field(init=False)
    dst_depth: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        L, H = self.n_blocks, self.n_heads
        if L < 1 or H < 1:
            raise ValueError(f"graph needs n_blocks >= 1 and n_heads >= 1, got {L}, {H}")
        src, sdep, dst, ddep = ["input"], [0], [], []
        for layer in range(L):
            src += [f"a{layer}.h{h}" for h in range(H)] + [f"m{layer}"]
            sdep += [layer + 1] * (H + 1)
            dst += [f"a{layer}.h{h}<{s}>" for h in range(H) for s in QKV] + [f"m{layer}"]
            ddep += [layer + 1] * (3 * H + 1)
        dst.append("logits")
        ddep.append(L + 1)
        object.__setattr__(self, "src_names", src)
        object.__setattr__(self, "dst_names", dst)
        object.__setattr__(self, "src_depth", np.asarray(sdep, dtype=np.int64))
        object.__setattr__(self, "dst_depth", np.asarray(ddep, dtype=np.int64))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ViTGraph):
            return NotImplemented
        return (self.n_blocks, self.n_heads) == (other.n_blocks, other.n_heads)

    def __hash__(self) -> int:
        return hash((self.n_blocks, self.n_heads))

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_names(cls, src_names: list[str], dst_names: list[str],
                   model_name: str = "vit") -> ViTGraph:
        """Rebuild a graph from node names (e.g. those found in an edge table)."""
        names = [*src_names, *dst_names]
        blocks = {b for n in names if (b := node_block(n)) is not None}
        heads = {h for n in names if (h := node_head(n)) is not None}
        if not blocks or not heads:
            raise TableError(f"cannot infer blocks/heads from node names {sorted(src_names)[:5]}")
        graph = cls(max(blocks) + 1, max(heads) + 1, model_name)
        unknown = (set(src_names) - set(graph.src_names)) | (set(dst_names) - set(graph.dst_names))
        if unknown:
            raise TableError(f"node names not in a {graph.n_blocks}-block, {graph.n_heads}-head "
                             f"ViT graph: {sorted(unknown)[:5]}")
        return graph

    # -- layout -------------------------------------------------------------------------
    @property
    def n_src(self) -> int:
        return len(self.src_names)

    @property
    def n_dst(self) -> int:
        return len(self.dst_names)

    @property
    def n_edges(self) -> int:
        return edge_count(self.n_blocks, self.n_heads)

    def n_sources_of(self, dst: int) -> int:
        """How many leading sources feed destination index `dst` (the prefix length)."""
        H = self.n_heads
        if dst == self.n_dst - 1:
            return self.n_src
        layer, slot = divmod(dst, 3 * H + 1)
        prefix = 1 + layer * (H + 1)
        return prefix + H if slot == 3 * H else prefix

    def edge_mask(self) -> np.ndarray:
        """Boolean [n_src, n_dst]: True where source u is computed before destination v reads."""
        mask = np.zeros((self.n_src, self.n_dst), dtype=bool)
        for j in range(self.n_dst):
            mask[: self.n_sources_of(j), j] = True
        return mask

    def src_index(self, name: str) -> int:
        return self.src_names.index(name)

    def dst_index(self, name: str) -> int:
        return self.dst_names.index(name)

    def block_dst_slice(self, layer: int) -> slice:
        """Columns of block `layer`'s destinations: 3H q/k/v (head-major) then the MLP."""
        width = 3 * self.n_heads + 1
        return slice(layer * width, (layer + 1) * width)

    def src_node(self, src: int) -> str:
        return self.src_names[src]

    def dst_node(self, dst: int) -> str:
        """Node that destination `dst` belongs to: 'a3.h1<q>' -> 'a3.h1' (a source name)."""
        return node_of(self.dst_names[dst])

    def edges(self) -> pd.DataFrame:
        """One row per edge in forward order (row-major over [src, dst]): a view for humans."""
        s, d = np.nonzero(self.edge_mask())
        return pd.DataFrame({
            "src": np.asarray(self.src_names, dtype=object)[s],
            "dst": np.asarray(self.dst_names, dtype=object)[d],
            "src_depth": self.src_depth[s], "dst_depth": self.dst_depth[d],
            "src_index": s, "dst_index": d,
        })
