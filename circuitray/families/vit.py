"""The timm `VisionTransformer` family: pre-norm blocks read through timm's own modules.

The family decides the block walk (`model.blocks`, timm `Block`), the norms and their
backward (affine LayerNorm `norm1`/`norm2`, pulled back analytically in `head_read_factors` and `mlp_read_grad`), the
q/k/v weights (`attn.qkv`), the extra tokens (class and register tokens, added by timm's
`_pos_embed`) and the readout (`norm`, then timm's own `forward_head`: pool, fc_norm, head).
Subclasses (`deit_distilled`) change what differs and inherit the rest.

Two ways to run a model:
- `ViTAdapter.instrument` wraps timm's own forward with recording hooks (and optionally
  replaces the `input` node); attribution uses it because it is the model's real code path.
- `ViTAdapter.graph_forward` recomputes the forward node by node, so every destination can
  read its own residual stream (circuit runs, single-edge patching, finite-difference oracles).
Both use the same modules and weights; tests check that they agree.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from circuitray.errors import InputError, UnsupportedModelError
from circuitray.families.base import FamilyAdapter, HeadFactors, Record, model_name, register
from circuitray.graph import ViTGraph


def _ln_stats(norm: nn.LayerNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1/σ [..., 1] and the normalized input x̂ of a LayerNorm at input x [..., D].

    One fused pass (LayerNorm without affine returns x̂, μ and 1/σ): mean + var + subtract +
    multiply took ~5x as long and ran twice per block and IG point.
    """
    xh, _, r = torch.native_layer_norm(x, [x.shape[-1]], None, None, norm.eps)
    return r, xh


def _ln_vjp(norm: nn.LayerNorm, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. LayerNorm's input, given the gradient g at its output (x: [..., D])."""
    r, xh = _ln_stats(norm, x)
    gw = g * norm.weight.to(g.dtype)
    return r * (gw - gw.mean(-1, keepdim=True) - xh * (gw * xh).mean(-1, keepdim=True))


def _head_read_factors(norm: nn.LayerNorm, qkv: nn.Linear, x: torch.Tensor, out: torch.Tensor,
                       g_qkv: torch.Tensor, n_heads: int) -> HeadFactors:
    """The q/k/v destinations' read gradients at one point, factored (see `_heads_from`).

    LN-VJP(g_{s,h} W_{s,h}) = r·g_{s,h}Wc_{s,h} − x̂·m_{s,h}, with Wc = γ-scaled, centred W and
    m = mean_d(r·g Wc ⊙ x̂) = r·Σ_i g_i (x̂·Wc_i)/D. Since x̂ sums to 0, x̂·Wc_i = x̂·(γW_i),
    which is the recorded q/k/v output minus its constant part (βWᵀ + b): m costs one pass
    over [N·T, 3D] and the big [3H, N·T, D] tensor is not built here at all.
    """
    N, T, D = x.shape
    dh = qkv.weight.shape[0] // (3 * n_heads)
    r, xh = _ln_stats(norm, x)
    r = r.reshape(N * T, 1)
    const = torch.zeros((), dtype=x.dtype, device=x.device)
    if norm.bias is not None:
        const = norm.bias.to(x.dtype) @ qkv.weight.to(x.dtype).T
    if qkv.bias is not None:
        const = const + qkv.bias.to(x.dtype)
    g = g_qkv.reshape(N * T, 3 * D)
    m = (g * (out.reshape(N * T, 3 * D) - const)).view(N * T, 3, n_heads, dh).sum(-1)
    m = (m * (r / D).unsqueeze(-1)).permute(2, 1, 0).reshape(3 * n_heads, N * T)
    gr = (g * r).view(N * T, 3, n_heads, dh).permute(2, 1, 0, 3).reshape(3 * n_heads, N * T, dh)
    return HeadFactors(gr, m, xh.reshape(N * T, D))


def _heads_from(norm: nn.LayerNorm, w_qkv: torch.Tensor, gr: torch.Tensor,
                m: torch.Tensor, xh: torch.Tensor) -> torch.Tensor:
    """[3H, N·T, D] = gr·Wc − Σ_k m_k ⊗ x̂_k, for gr [3H, N·T, dh], m [K, 3H, N·T], x̂ [K, N·T, D].

    Linear in gr, so gr may be a sum over EAP-IG's points: one bmm per batch instead of one
    per point. Folding γ and the centring into W leaves one bmm and one pass over the result.
    """
    H3, NT, dh = gr.shape
    D = xh.shape[-1]
    wg = w_qkv.to(gr.dtype).view(3, H3 // 3, dh, D) * norm.weight.to(gr.dtype)
    wg = wg.transpose(0, 1).reshape(H3, dh, D)
    wg = wg - wg.mean(-1, keepdim=True)  # centred rows: the bmm subtracts mean(γg') itself
    grads = torch.bmm(gr, wg)
    for m_k, xh_k in zip(m, xh, strict=True):  # one in-place pass per point (a batched
        grads.addcmul_(xh_k, m_k.unsqueeze(-1), value=-1)  # [3H,K]@[K,D] was no faster)
    return grads


@register
class ViTAdapter(FamilyAdapter):
    """Reads a timm `VisionTransformer` as the graph of DESIGN §1; refuses what breaks it."""

    family = "vit"
    model_class = "timm.models.vision_transformer.VisionTransformer"

    def __init__(self, model: nn.Module):
        self.model = model
        self.name = model_name(model)
        self._validate_model()
        self._validate_blocks()
        blk = model.blocks[0]
        self.n_blocks = len(model.blocks)
        self.n_heads = blk.attn.num_heads
        self.head_dim = blk.attn.head_dim
        self.dim = model.embed_dim
        self.graph = ViTGraph(self.n_blocks, self.n_heads, self.name)

    # -- validation ---------------------------------------------------------------------
    def _refuse(self, part: str, reason: str) -> None:
        raise UnsupportedModelError(self.name, part, reason)

    def _validate_model(self) -> None:
        """The model-level parts this family reads: class, tokens, readout."""
        from timm.models.vision_transformer import VisionTransformer

        m = self.model
        if not isinstance(m, VisionTransformer):
            self._refuse("architecture", f"{type(m).__name__} is not a timm VisionTransformer")
        if getattr(m, "dist_token", None) is not None or hasattr(m, "head_dist"):
            self._refuse("distillation token", "DeiT distillation heads have two readouts; "
                         "the 'deit-distilled' family reads them (circuitray.families."
                         "adapter_for picks it for timm's VisionTransformerDistilled)")
        if getattr(m, "attn_pool", None) is not None:
            self._refuse(f"global_pool={m.global_pool!r}",
                         "attention-pool readout is a learned attention, not a residual read")

    def _validate_blocks(self) -> None:
        """The block walk: pre-norm timm Blocks with affine LayerNorms and plain attention."""
        from timm.layers import LayerScale
        from timm.layers.attention import Attention
        from timm.models.vision_transformer import Block

        m = self.model
        if len(m.blocks) == 0:
            self._refuse("depth", "model has no blocks")
        for i, blk in enumerate(m.blocks):
            where = f"blocks[{i}]"
            if type(blk) is not Block:
                self._refuse(f"{where} ({type(blk).__name__})",
                             "only pre-norm timm Block is supported (no post-norm/parallel blocks)")
            attn = blk.attn
            if type(attn) is not Attention:
                self._refuse(f"{where}.attn ({type(attn).__name__})", "only timm Attention")
            if not isinstance(attn.norm, nn.Identity):
                self._refuse(f"{where}.attn.norm (scale_norm)",
                             "a norm between heads and proj mixes heads")
            if getattr(attn, "gate", None) is not None:
                self._refuse(f"{where}.attn.gate", "gated attention reads the residual twice")
            for nm in ("norm1", "norm2"):
                norm = getattr(blk, nm)
                if not isinstance(norm, nn.LayerNorm) or not norm.elementwise_affine:
                    self._refuse(f"{where}.{nm} ({type(norm).__name__})",
                                 "block norms must be affine LayerNorm")
            for nm in ("ls1", "ls2"):
                if not isinstance(getattr(blk, nm), (LayerScale, nn.Identity)):
                    self._refuse(f"{where}.{nm}", "unknown layer scale")
            if not hasattr(blk.mlp, "fc2"):
                self._refuse(f"{where}.mlp ({type(blk.mlp).__name__})", "MLP without fc2")
            if attn.num_heads != m.blocks[0].attn.num_heads:
                self._refuse(f"{where}.attn.num_heads", "head count differs between blocks")

    # -- parameters read as constants -----------------------------------------------------
    @staticmethod
    def _gamma(ls: nn.Module, like: torch.Tensor) -> torch.Tensor:
        if isinstance(ls, nn.Identity):
            return torch.ones((), dtype=like.dtype, device=like.device)
        return ls.gamma.to(like.dtype)

    def _bias(self, linear: nn.Module, ls: nn.Module, like: torch.Tensor) -> torch.Tensor:
        b = getattr(linear, "bias", None)
        if b is None:
            return torch.zeros((), dtype=like.dtype, device=like.device)
        return b.to(like.dtype) * self._gamma(ls, like)

    def mlp_bias(self, layer: int, like: torch.Tensor) -> torch.Tensor:
        blk = self.model.blocks[layer]
        return self._bias(blk.mlp.fc2, blk.ls2, like)

    def head_outputs(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """Per-head source values z_h W_proj,h^T ⊙ γ1 (no bias): [..., T, H·dh] -> [H, ..., T, D]."""
        blk = self.model.blocks[layer]
        w = blk.attn.proj.weight.to(z.dtype).view(self.dim, self.n_heads, self.head_dim)
        zh = z.unflatten(-1, (self.n_heads, self.head_dim))
        out = torch.einsum("...thi,dhi->h...td", zh, w)
        return out * self._gamma(blk.ls1, out)

    @torch.no_grad()
    def expand_sources(self, inp: torch.Tensor, zs: list[torch.Tensor],
                       ms: list[torch.Tensor]) -> torch.Tensor:
        """Stack node values in graph source order: [n_src, ..., T, D].

        `ms` are MLP outputs after LayerScale *with* fc2's bias; the bias is removed here
        because biases belong to no node (DESIGN §2). Node values are data here, never
        differentiated through, hence no_grad.
        """
        H = self.n_heads
        out = inp.new_empty((self.graph.n_src, *inp.shape))  # filled in place: no 2x peak
        out[0] = inp
        for layer, (z, m) in enumerate(zip(zs, ms, strict=True)):
            first = 1 + layer * (H + 1)
            out[first:first + H] = self.head_outputs(layer, z)
            torch.sub(m, self.mlp_bias(layer, m), out=out[first + H])
        return out

    # -- input checks -------------------------------------------------------------------
    def check_images(self, images: torch.Tensor, where: str) -> None:
        """Fail early, naming the batch, on shapes the model cannot take or non-finite pixels."""
        pe = self.model.patch_embed
        if not torch.is_tensor(images) or images.ndim != 4:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise InputError(f"{where}: expected an image tensor [B, C, H, W], got {shape}")
        chans = self.model.in_chans if hasattr(self.model, "in_chans") else images.shape[1]
        if images.shape[1] != chans:
            raise InputError(f"{where}: model '{self.name}' expects {chans} channels, "
                             f"got {images.shape[1]} (shape {tuple(images.shape)})")
        size = getattr(pe, "img_size", None)
        if size is not None and getattr(pe, "strict_img_size", True) and \
                tuple(images.shape[-2:]) != tuple(size):
            raise InputError(f"{where}: model '{self.name}' expects images of size "
                             f"{tuple(size)}, got {tuple(images.shape[-2:])}")
        if not torch.isfinite(images).all():
            raise InputError(f"{where}: images contain NaN or infinite pixel values")

    # -- tokens and readout ---------------------------------------------------------------
    @property
    def extra_tokens(self) -> tuple[str, ...]:
        """Class token (when present), then registers: timm's `_pos_embed` order."""
        m = self.model
        cls = ("cls",) if getattr(m, "cls_token", None) is not None else ()
        return cls + tuple(f"reg{i}" for i in range(getattr(m, "num_reg_tokens", 0)))

    # -- running the model --------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The `input` node: residual stream after norm_pre (tokens and positions included)."""
        m = self.model
        x = m.patch_embed(images)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def readout(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits from the final residual stream (final norm, pool, head)."""
        return self.model.forward_head(self.model.norm(resid))

    @contextmanager
    def instrument(self, input_override: torch.Tensor | None = None) -> Iterator[Record]:
        """Record what attribution needs during timm's own forward; recording hooks return None.

        With `input_override`, the `input` node (norm_pre's output) is replaced by it.
        """
        rec, handles, m = Record(), [], self.model

        def on_input(_mod, _inp, out):
            if input_override is not None:
                rec.input = input_override
                return input_override
            rec.input = out
            return None

        def on_norm2(_mod, inp, out):
            rec.x_mid.append(inp[0])
            rec.n2.append(out)

        handles.append(m.norm_pre.register_forward_hook(on_input))
        for blk in m.blocks:
            handles += [
                blk.norm1.register_forward_hook(lambda _m, i, _o: rec.x_in.append(i[0])),
                blk.attn.qkv.register_forward_hook(lambda _m, _i, o: rec.qkv.append(o)),
                blk.attn.proj.register_forward_pre_hook(lambda _m, i: rec.z.append(i[0])),
                blk.norm2.register_forward_hook(on_norm2),
                blk.ls2.register_forward_hook(lambda _m, _i, o: rec.mlp.append(o)),
            ]
        handles.append(m.norm.register_forward_hook(
            lambda _m, i, _o: setattr(rec, "final", i[0])))
        try:
            yield rec
        finally:
            for h in handles:
                h.remove()

    def head_read_factors(self, rec: Record, grads: Sequence[torch.Tensor], layer: int,
                          dtype: torch.dtype) -> HeadFactors:
        """Block `layer`'s q/k/v gradients, pulled back through W_qkv per head and norm1."""
        blk = self.model.blocks[layer]
        return _head_read_factors(blk.norm1, blk.attn.qkv, rec.x_in[layer].detach().to(dtype),
                                  rec.qkv[layer].detach().to(dtype), grads[layer].to(dtype),
                                  self.n_heads)

    def head_read_grads(self, layer: int, gr: torch.Tensor, m: torch.Tensor,
                        xh: torch.Tensor) -> torch.Tensor:
        blk = self.model.blocks[layer]
        return _heads_from(blk.norm1, blk.attn.qkv.weight, gr, m, xh)

    def mlp_read_grad(self, rec: Record, grads: Sequence[torch.Tensor], layer: int,
                      dtype: torch.dtype) -> torch.Tensor:
        """Block `layer`'s norm2-output gradient pulled back through norm2."""
        x_mid = rec.x_mid[layer].detach().to(dtype)
        return _ln_vjp(self.model.blocks[layer].norm2, x_mid, grads[self.n_blocks + layer].to(dtype))

    def _attention(self, layer: int, q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor) -> torch.Tensor:
        """Softmax attention exactly as the timm module computes it (fused or not)."""
        attn = self.model.blocks[layer].attn
        if attn.fused_attn:
            return F.scaled_dot_product_attention(q, k, v)
        w = (q * attn.scale) @ k.transpose(-2, -1)
        return w.softmax(dim=-1) @ v

    def graph_forward(self, images: torch.Tensor, *,
                      mask: torch.Tensor | None = None,
                      ablated: torch.Tensor | None = None,
                      input_override: torch.Tensor | None = None,
                      dst_extra: Mapping[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits of a run where destination v reads Σ_u [m_uv a_u + (1−m_uv) ã_u] + biases.

        `mask` [n_src, n_dst] (1 keeps the edge, None keeps all), `ablated` ã [n_src, N|1, T, D]
        (needed when the mask drops edges), `dst_extra` {dst index: tensor added to its input}.
        Sources are recomputed from their (patched) inputs, as a circuit run requires.
        """
        g, H, dh, D = self.graph, self.n_heads, self.head_dim, self.dim
        e = self.embed(images) if input_override is None else input_override
        N, T = e.shape[0], e.shape[1]
        extra = dict(dst_extra or {})
        if mask is not None:
            mask = mask.to(e.dtype)
            if ablated is None:
                raise InputError("graph_forward: a mask that drops edges needs ablated values")
            ablated = ablated.to(e.dtype).expand(g.n_src, N, T, D)
        srcs = [e]
        const = torch.zeros(D, dtype=e.dtype, device=e.device)

        def read(cols: list[int], p: int) -> torch.Tensor:
            a = torch.stack(srcs[:p])
            if mask is None:
                x = a.sum(0).expand(len(cols), N, T, D) + const
            else:
                mk = mask[:p, cols]
                x = (torch.einsum("pv,pntd->vntd", mk, a)
                     + torch.einsum("pv,pntd->vntd", 1 - mk, ablated[:p]) + const)
            bump = [extra.get(c) for c in cols]
            if any(b is not None for b in bump):
                x = x + torch.stack([torch.zeros_like(x[0]) if b is None else b for b in bump])
            return x

        for layer, blk in enumerate(self.model.blocks):
            attn = blk.attn
            cols = list(range(g.block_dst_slice(layer).start, g.block_dst_slice(layer).stop))
            p = g.n_sources_of(cols[0])
            xin = read(cols[:-1], p).view(H, 3, N, T, D)
            w = attn.qkv.weight.to(e.dtype).view(3, H, dh, D)
            qkv = torch.einsum("hsntd,shid->shnti", blk.norm1(xin), w)
            if attn.qkv.bias is not None:
                qkv = qkv + attn.qkv.bias.to(e.dtype).view(3, H, 1, 1, dh)
            q, k, v = (t.transpose(0, 1) for t in qkv)  # [N, H, T, dh]
            z = self._attention(layer, attn.q_norm(q), attn.k_norm(k), v)
            z = z.transpose(1, 2).reshape(N, T, H * dh)
            srcs += list(self.head_outputs(layer, z).unbind(0))
            const = const + self._bias(attn.proj, blk.ls1, e)
            xm = read([cols[-1]], p + H)[0]
            out = blk.ls2(blk.mlp(blk.norm2(xm)))
            srcs.append(out - self.mlp_bias(layer, out))
            const = const + self.mlp_bias(layer, out)
        return self.readout(read([g.n_dst - 1], g.n_src)[0])
