"""Attention providers: the same function (prefix attention, bottom-right causal) computed several ways.

Every provider takes an ``AttnInputs`` (q, k, v and a prefix shared by the batch) and returns a
zero-argument callable giving the (B, Hq, Sq, D) output. What a model computes once per forward
for all layers (the mask, FlexAttention's block mask) is built outside the callable; what it does in
every layer (expanding and concatenating the prefix, repeating K/V for GQA) is inside it.

- ``prefixattn``: ``prefixattn.prefix_attention`` (fused kernels on GPU).
- ``concat_sdpa_mask``: what PEFT prefix tuning + transformers' sdpa path do today: expand the
  prefix over the batch, concatenate it in front of K/V, repeat K/V over the GQA group (transformers
  does when a mask is present), and run SDPA with the materialized (B, 1, Sq, P + Sk) bool mask.
- ``concat_sdpa_causal``: concatenate, then SDPA with a lower-right causal bias (which is exactly
  "prefix visible + causal" when the prefix sits in front); torch dispatches it to flash or
  memory-efficient attention (cuDNN has no lower-right causal); the one used is recorded.
- ``concat_flex``: concatenate, FlexAttention (torch.compile'd on GPU) with a block mask where the
  prefix is visible and the sequence causal.
- ``concat_flex_compiled``: the same, compiled on every device (on a CPU by inductor's C++ backend,
  forward only: torch has no FlexAttention backward on a CPU). Cartridges' own trainer's path.
- ``eager``: transformers' eager attention: repeat K/V, matmul, additive mask, fp32 softmax, matmul.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import prefixattn

Fn = Callable[[], torch.Tensor]


class Unsupported(RuntimeError):
    """A provider cannot run this configuration here; the message says why (recorded as a skip)."""


@dataclass
class AttnInputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pk: torch.Tensor  # (Hkv, P, D) shared, or (N, Hkv, P, D) bank
    pv: torch.Tensor
    prefix_index: torch.Tensor | None = None

    @property
    def B(self) -> int:
        return self.q.shape[0]

    @property
    def H(self) -> int:
        return self.q.shape[1]

    @property
    def Hkv(self) -> int:
        return self.k.shape[1]

    @property
    def Sq(self) -> int:
        return self.q.shape[2]

    @property
    def Sk(self) -> int:
        return self.k.shape[2]

    @property
    def P(self) -> int:
        return self.pk.shape[-2]

    @property
    def D(self) -> int:
        return self.q.shape[3]

    @property
    def scale(self) -> float:
        return self.D ** -0.5

    def tensors(self) -> list[torch.Tensor]:
        return [self.q, self.k, self.v, self.pk, self.pv]


def make_inputs(*, B: int, H: int, Hkv: int, Sq: int, Sk: int, P: int, D: int, dtype: torch.dtype,
                device: torch.device, grad_qkv: bool = True, bank: int | None = None,
                seed: int = 0) -> AttnInputs:
    """Random inputs (never zeros), at the magnitude a model sees; the prefix requires grad."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape: int, req: bool) -> torch.Tensor:
        t = torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
        return t.requires_grad_(req)

    pshape = (Hkv, P, D) if bank is None else (bank, Hkv, P, D)
    x = AttnInputs(rnd(B, H, Sq, D, req=grad_qkv), rnd(B, Hkv, Sk, D, req=grad_qkv),
                   rnd(B, Hkv, Sk, D, req=grad_qkv), rnd(*pshape, req=True), rnd(*pshape, req=True))
    if bank is not None:
        x.prefix_index = (torch.arange(B) % bank).to(device)
    return x


# ---------------------------------------------------------------------------------------------
# building blocks shared by the concatenating baselines
# ---------------------------------------------------------------------------------------------


def batch_prefix(x: AttnInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Hkv, P, D) prefix per row: expanded if shared, gathered if a bank."""
    if x.prefix_index is not None:
        return x.pk.index_select(0, x.prefix_index), x.pv.index_select(0, x.prefix_index)
    return x.pk.unsqueeze(0).expand(x.B, -1, -1, -1), x.pv.unsqueeze(0).expand(x.B, -1, -1, -1)


def concat_kv(x: AttnInputs) -> tuple[torch.Tensor, torch.Tensor]:
    pk, pv = batch_prefix(x)
    return torch.cat([pk, x.k], dim=2), torch.cat([pv, x.v], dim=2)


def repeat_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """transformers' repeat_kv: (B, Hkv, L, D) -> (B, Hkv * groups, L, D)."""
    if groups == 1:
        return t
    B, Hkv, L, D = t.shape
    return t[:, :, None].expand(B, Hkv, groups, L, D).reshape(B, Hkv * groups, L, D)


def prefix_causal_mask(x: AttnInputs) -> torch.Tensor:
    """The (B, 1, Sq, P + Sk) bool mask transformers builds for a prefix cache: True = attend."""
    i = torch.arange(x.Sq, device=x.q.device).view(-1, 1)
    j = torch.arange(x.P + x.Sk, device=x.q.device).view(1, -1)
    visible = (j < x.P) | (j - x.P <= i + (x.Sk - x.Sq))
    return visible.view(1, 1, x.Sq, x.P + x.Sk).expand(x.B, 1, -1, -1).contiguous()


# ---------------------------------------------------------------------------------------------
# providers
# ---------------------------------------------------------------------------------------------


def backend_label(backend: str, q: torch.Tensor) -> str:
    """What ``backend`` resolves to for tensors like ``q``: 'triton', 'triton (interpreter)' or 'torch'."""
    from prefixattn.ops import resolve_backend

    which = resolve_backend(backend, q)
    return "triton (interpreter)" if which == "triton" and q.device.type != "cuda" else which


def prefixattn_provider(x: AttnInputs, backend: str = "auto", deterministic: bool = True) -> tuple[Fn, str]:
    label = backend_label(backend, x.q)

    def fn() -> torch.Tensor:
        return prefixattn.prefix_attention(x.q, x.k, x.v, x.pk, x.pv, prefix_index=x.prefix_index,
                                           backend=backend, deterministic=deterministic)

    return fn, label


def prefixattn_atomic_provider(x: AttnInputs, backend: str = "auto") -> tuple[Fn, str]:
    """prefixattn with deterministic=False: dq and the prefix gradient through fp32 atomics."""
    fn, label = prefixattn_provider(x, backend, deterministic=False)
    return fn, f"{label}, atomics"


def concat_sdpa_mask(x: AttnInputs) -> tuple[Fn, str]:
    mask = prefix_causal_mask(x)
    G = x.H // x.Hkv

    def fn() -> torch.Tensor:
        K, V = concat_kv(x)
        return F.scaled_dot_product_attention(x.q, repeat_kv(K, G), repeat_kv(V, G), attn_mask=mask,
                                              scale=x.scale)

    with torch.no_grad():
        K, V = concat_kv(x)
        which = sdpa_choice(x.q, repeat_kv(K, G), repeat_kv(V, G), mask)
    return fn, which


def sdpa_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> str:
    """The kernel torch's SDPA dispatcher picks for these inputs (flash, efficient, cudnn, math)."""
    try:
        from torch.nn.attention import SDPBackend

        choice = torch._fused_sdp_choice(q, k, v, mask, 0.0, False)
        name = SDPBackend(choice).name.lower().replace("_attention", "")
    except Exception:  # private API: best effort
        return "sdpa (unknown kernel)"
    return name if q.device.type == "cuda" else f"{name} (cpu)"


def _sdpa_lower_right_backend(x: AttnInputs, K: torch.Tensor, V: torch.Tensor) -> str:
    """Which kernel torch's CausalBias dispatch uses for a lower-right causal SDPA with these inputs."""
    if x.q.device.type != "cuda":
        return "math (cpu)"
    from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention

    try:
        params = SDPAParams(x.q, K, V, None, 0.0, False, False)
    except TypeError:  # older signature without enable_gqa
        params = SDPAParams(x.q, K, V, None, 0.0, False)
    if can_use_flash_attention(params):
        return "flash"
    if can_use_efficient_attention(params):
        return "efficient"
    return "math (materialized mask)"


def concat_sdpa_causal(x: AttnInputs) -> tuple[Fn, str]:
    from torch.nn.attention.bias import causal_lower_right

    bias = causal_lower_right(x.Sq, x.P + x.Sk)
    G = x.H // x.Hkv

    def fn() -> torch.Tensor:
        K, V = concat_kv(x)
        # K/V repeated over the GQA group: the lower-right dispatch calls the kernels directly and
        # does not take enable_gqa through to the efficient kernel
        return F.scaled_dot_product_attention(x.q, repeat_kv(K, G), repeat_kv(V, G), attn_mask=bias,
                                              scale=x.scale)

    with torch.no_grad():
        K, V = concat_kv(x)
        which = _sdpa_lower_right_backend(x, repeat_kv(K, G), repeat_kv(V, G))
    return fn, which


_FLEX_COMPILED = None


def _flex():
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        # one compiled graph per benchmark shape: raise the recompilation limit accordingly
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
        try:  # donated buffers forbid backward(retain_graph=True), which the bwd mode needs
            import torch._functorch.config as fconfig

            fconfig.donated_buffer = False
        except (ImportError, AttributeError):
            pass
        if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
            torch._dynamo.config.accumulated_recompile_limit = 4096
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


def concat_flex(x: AttnInputs, compile_on_cpu: bool = False) -> tuple[Fn, str]:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:  # pragma: no cover - torch too old
        raise Unsupported(f"FlexAttention unavailable: {e}") from e
    P, off = x.P, x.Sk - x.Sq

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < P) | (kv_idx - P <= q_idx + off)

    dev = x.q.device
    if dev.type != "cuda" and any(t.requires_grad for t in x.tensors()):
        raise Unsupported("FlexAttention has no backward on CPU")
    block_mask = create_block_mask(mask_mod, None, None, x.Sq, P + x.Sk, device=str(dev))
    gqa = x.H != x.Hkv
    # compiled on GPU; on CPU the uncompiled path (a correctness check of the harness only) unless asked
    compiled = dev.type == "cuda" or compile_on_cpu
    attn = _flex() if compiled else flex_attention

    def fn() -> torch.Tensor:
        K, V = concat_kv(x)
        return attn(x.q, K, V, block_mask=block_mask, scale=x.scale, enable_gqa=gqa)

    if dev.type == "cuda":
        return fn, "compiled"
    return fn, "compiled (cpu, inductor)" if compiled else "eager (cpu)"


def concat_flex_compiled(x: AttnInputs) -> tuple[Fn, str]:
    return concat_flex(x, compile_on_cpu=True)


def eager(x: AttnInputs) -> tuple[Fn, str]:
    mask = prefix_causal_mask(x)
    add = torch.zeros(mask.shape, dtype=x.q.dtype, device=x.q.device).masked_fill_(
        ~mask, torch.finfo(x.q.dtype).min)
    G = x.H // x.Hkv

    def fn() -> torch.Tensor:
        K, V = concat_kv(x)
        s = torch.matmul(x.q, repeat_kv(K, G).transpose(2, 3)) * x.scale + add
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(x.q.dtype)
        return torch.matmul(p, repeat_kv(V, G))

    return fn, "matmul+softmax"


PROVIDERS: dict[str, Callable[..., tuple[Fn, str]]] = {
    "prefixattn": prefixattn_provider,
    "prefixattn_atomic": prefixattn_atomic_provider,
    "concat_sdpa_mask": concat_sdpa_mask,
    "concat_sdpa_causal": concat_sdpa_causal,
    "concat_flex": concat_flex,
    "concat_flex_compiled": concat_flex_compiled,
    "eager": eager,
}


def eager_bytes(x: AttnInputs, mode: str) -> int:
    """Rough bytes the materializing eager path needs (scores, fp32 softmax, probs, their grads)."""
    elems = x.B * x.H * x.Sq * (x.P + x.Sk)
    per = 2 + 4 + 2 + (8 if "bwd" in mode else 0)
    return elems * per
