"""Deltas: the functional forms, each a small nn.Module (He et al. 2022, "Towards a Unified View").

A delta computes a change from what it reads (a site's input or output). How that change meets the
hidden state is the combine's business (see ``combine.py``), so the same delta serves several methods.
Deltas that are linear maps also give their weight form (``delta_weight``), which makes merging generic.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .mechanisms import PassClock

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


def folded_state(delta: nn.Module) -> dict[str, torch.Tensor]:
    """A delta's state as a saved adapter holds it: without training-only parts (a prefix's MLP),
    for deltas that have a ``folded_state``; else its plain state dict."""
    return delta.folded_state() if hasattr(delta, "folded_state") else delta.state_dict()


class LowRank(nn.Module):
    """delta(x) = scale * B A dropout(x): A (r, in), B (out, r); B = 0 so training starts at the base model (LoRA, Hu et al. 2021).

    ``set_offset()`` freezes the current (A, B) as (A0, B0) and subtracts them: delta = scale (B A - B0 A0) x.
    Inits that start A and B at a non-zero pair taken from the weight (PiSSA, OLoRA) use it, so the delta
    still starts at exactly zero and the base weight is never changed (the two products are computed apart,
    so that at init they cancel bitwise). ``decompose(W)`` adds DoRA's magnitude (see ``decomposed``).
    """

    def __init__(self, in_features: int, out_features: int, r: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # loralib's init (METHODS.md §15)
        self.scale = self.weight_scale = scale  # an embedding's output scale may differ from its weight's (below)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.offset = False

    def set_offset(self) -> None:
        """Freeze the current factors as (A0, B0), buffers saved with the adapter: the delta is now zero."""
        self.register_buffer("A0", self.A.detach().clone())
        self.register_buffer("B0", self.B.detach().clone())
        self.offset = True

    @property
    def rank(self) -> int:
        """The rank the delta's weight can have (2r with an offset)."""
        return self.A.shape[0] * (2 if self.offset else 1)

    def lowrank_factors(self):
        """(A, B, scale) when this delta is exactly scale B A x: no offset, no dropout at work, a matmul lookup
        (not an embedding's); else None. Serving gathers the factors of many adapters into one matmul."""
        dropping = self.training and not isinstance(self.dropout, nn.Identity)
        if self.offset or dropping or type(self).lookup is not LowRank.lookup:
            return None
        return self.A, self.B, self.scale

    def lookup(self, x, A):  # (..., in) -> (..., r): A x (an embedding delta looks rows up instead)
        return F.linear(x, A)

    def forward(self, x):  # x: (..., in) -> (..., out)
        x = self.dropout(x)
        y = F.linear(self.lookup(x, self.A), self.B)
        if self.offset:
            y = y - F.linear(self.lookup(x, self.A0), self.B0)
        return y * self.scale

    def delta_weight(self) -> torch.Tensor:  # (out, in)
        w = self.B @ self.A
        if self.offset:
            w = w - self.B0 @ self.A0
        return w * self.weight_scale

    def add_to(self, out, x):
        """out + delta(x) with the scale and the sum fused into one addmm (in place when no graph is
        recorded): the unfused form costs two extra passes over ``out``, most of LoRA's overhead."""
        if self.offset:
            return out + self(x).to(out.dtype)
        h = self.lookup(self.dropout(x), self.A)
        if not out.dtype == h.dtype == self.B.dtype or not out.is_contiguous():  # autocast; a fused slice
            return out + (F.linear(h, self.B) * self.scale).to(out.dtype)
        flat, h = out.view(-1, out.shape[-1]), h.reshape(-1, h.shape[-1])
        if torch.is_grad_enabled():
            return torch.addmm(flat, h, self.B.t(), alpha=self.scale).view(out.shape)
        return flat.addmm_(h, self.B.t(), alpha=self.scale).view(out.shape)

    # -- DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", §4): W' = m (W + dW) / ||W + dW||,
    # the norm taken over each output row of the (out, in) weight (peft's convention), m a trained vector.

    def decompose(self, weight: torch.Tensor) -> None:
        """Add the magnitude m (out,), initialised to the row norms of ``weight`` (out, in) + delta: W' = W at init."""
        self.m = nn.Parameter(self.weight_norm(weight))

    @torch.no_grad()
    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:  # (out,)
        """||W + dW|| per output row, without a gradient (DoRA §4.3 treats it as a constant).

        With dW = s B A (rank r, B0 A0 subtracted as a second factor pair): ||W_i||^2 + 2 s B_i (A W_i^T)
        + s^2 B_i (A A^T) B_i^T, which never forms W + dW (o x in) and costs one (o, in) x (in, r) product.
        Where a row's norm is below a tenth of ||W_i|| (dW nearly cancels W: rounding of the sum would show),
        the rows are summed directly instead. That check reads the result on the host, which on an
        accelerator would wait for its queue at every DoRA layer of every step: there the rows are summed
        directly, always (the form peft uses)."""
        if weight.device.type != "cpu":
            return torch.linalg.vector_norm(weight.float() + self.delta_weight().float(), dim=1).to(self.A.dtype)
        A, B = self.A.float(), self.B.float()
        if self.offset:
            A, B = torch.cat([A, self.A0.float()]), torch.cat([B, -self.B0.float()], dim=1)
        W, s = weight.float(), self.weight_scale
        w2 = torch.linalg.vector_norm(W, dim=1).square()
        n2 = w2 + 2 * s * ((W @ A.t()) * B).sum(1) + s * s * ((B @ (A @ A.t())) * B).sum(1)
        if bool((n2 < 0.01 * w2).any()):
            n2 = torch.linalg.vector_norm(W + self.delta_weight().float(), dim=1).square()
        return n2.sqrt().to(self.A.dtype)

    def decomposed(self, out, x, weight, bias):
        """DoRA's output from the module's own: g (W x + dW x) + b with g = m / ||W + dW||, as
        g (out - b + dW x) + b = g (out + dW x) + (1 - g) b: one addcmul and one addmm over ``out``
        (..., o), the module's output (its slice's rows of ``weight`` (o, in) and ``bias`` (o,) or None);
        in training through ``_DoraOutput``, whose backward makes fewer passes over ``out`` than autograd's.
        Under dropout (training) the update reads dropout(x), and so does the base's share that g
        rescales (out + (g - 1) W dropout(x) + g dW dropout(x)), as in DoRA's code and peft."""
        g = self.m / self.weight_norm(weight)  # (o,); the gradient reaches m only
        if self.training and not isinstance(self.dropout, nn.Identity):
            xd = self.dropout(x)
            base = F.linear(xd, weight.to(xd.dtype))
            return out + ((g - 1) * base + g * self._undropped(xd)).to(out.dtype)
        h = self.lookup(x, self.A)
        if (torch.is_grad_enabled() and not self.offset and out.dtype == h.dtype == self.B.dtype == g.dtype
                and (bias is None or not bias.requires_grad)):  # a trained bias: autograd's graph below
            flat, h = out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1])
            return _DoraOutput.apply(flat, h, self.B, g, bias, self.scale).view(out.shape)
        if self.offset or not out.dtype == h.dtype == self.B.dtype or not out.is_contiguous():
            y = out + self._undropped(x).to(out.dtype)
        else:
            flat = out.view(-1, out.shape[-1])
            h = h.reshape(-1, h.shape[-1])
            y = (torch.addmm(flat, h, self.B.t(), alpha=self.scale) if torch.is_grad_enabled()
                 else flat.addmm_(h, self.B.t(), alpha=self.scale)).view(out.shape)
        g = g.to(y.dtype)
        if bias is None:
            return y * g if torch.is_grad_enabled() else y.mul_(g)
        rest = bias.to(y.dtype) * (1 - g)  # (o,)
        return torch.addcmul(rest, y, g) if torch.is_grad_enabled() else y.mul_(g).add_(rest)

    def _undropped(self, x):  # delta(x) without the delta's dropout (x is already dropped, or at evaluation)
        y = F.linear(self.lookup(x, self.A), self.B)
        if self.offset:
            y = y - F.linear(self.lookup(x, self.A0), self.B0)
        return y * self.scale

    @torch.no_grad()
    def decomposed_weight(self, weight: torch.Tensor) -> torch.Tensor:  # (o, in): the merged weight
        g = self.m / self.weight_norm(weight)
        return (g[:, None].float() * (weight.float() + self.delta_weight().float())).to(weight.dtype)


class _DoraOutput(torch.autograd.Function):
    """DoRA's training output z = g out + (1 - g) b + s h (g B)^T with its gradient written out: out (T, o) the
    module's output (bias included), h = A x (T, r), B (o, r), g (o,), b (o,) or None, s the scale.
    Autograd's own graph of the same sum (addmm, then addcmul) keeps two (T, o) results and makes three more
    in the backward; this keeps one and makes one (the step's overhead over LoRA is mostly these passes)."""

    @staticmethod
    def forward(ctx, out, h, B, g, b, s):
        z = out * g if b is None else torch.addcmul((1 - g) * b, out, g)
        z.addmm_(h, (B * g[:, None]).t(), alpha=s)
        ctx.save_for_backward(out, h, B, g, b)
        ctx.s = s
        return z

    @staticmethod
    def backward(ctx, gz):
        out, h, B, g, b = ctx.saved_tensors
        s = ctx.s
        M = gz.t() @ h  # (o, r): gz^T h, shared by B's gradient and g's
        buf = gz * out  # (T, o): then gz g in the same memory (one (T, o) tensor made, not two)
        grad_g = buf.sum(0) + s * (B * M).sum(1)  # dz/dg = out - b + s h B^T
        if b is not None:
            grad_g -= b * gz.sum(0)
        gy = torch.mul(gz, g, out=buf) if ctx.needs_input_grad[0] or ctx.needs_input_grad[1] else None
        grad_h = (gy @ B) * s if ctx.needs_input_grad[1] else None
        grad_B = M * (s * g)[:, None] if ctx.needs_input_grad[2] else None
        return (gy if ctx.needs_input_grad[0] else None), grad_h, grad_B, grad_g, None, None


class EmbeddingLowRank(LowRank):
    """LoRA on a token embedding E (num, dim): delta(ids) = scale * A^T[ids] B^T, A (r, num), B (dim, r), as a
    linear map from one-hot ids (``delta_weight`` (dim, num) is E^T's update). A = 0 and B ~ N(0, 1) at init
    (loralib's and peft's embedding init, the other way round from LoRA on projections); no dropout (ids
    cannot be dropped). ``padding_idx``: the embedding's, whose row gets no gradient, as in the embedding itself.
    ``embed_scale``: a factor the embedding applies to its output (BART's scaled embeddings), applied to the
    delta's output too, so that merging dW into the weight gives the same. ``foldable=False`` where the
    embedding's weight is tied to another module (an LM head), which a merge would change too."""

    def __init__(self, num: int, dim: int, r: int, scale: float, padding_idx: int | None = None,
                 embed_scale: float = 1.0, foldable: bool = True):
        super().__init__(num, dim, r, scale)
        nn.init.zeros_(self.A)
        nn.init.normal_(self.B)
        self.scale = scale * embed_scale
        self.padding_idx, self.foldable = padding_idx, foldable

    def lookup(self, ids, A):  # (...,) -> (..., r)
        return F.embedding(ids, A.t(), padding_idx=self.padding_idx)


class Bottleneck(nn.Module):
    """delta(h) = scale * W_up act(W_down h + b_down) + b_up: the adapter of Houlsby et al. 2019 and its kin.

    ``init``: 'houlsby' (both projections N(0, 1e-2) truncated at 2 sigma: near identity),
    'bert' (N(0, 0.02) down, zero up: exactly identity), 'lora' (kaiming-uniform down, zero up; He et al.'s PA).
    ``dropout``: on the bottleneck activation while training, before W_up (the unify code's
    Adapter_Layer, which runs He et al.'s parallel adapter with the model's dropout).
    """

    def __init__(self, d: int, bottleneck: int, activation: str = "relu", init: str = "bert", scale: float = 1.0,
                 dropout: float = 0.0):
        super().__init__()
        self.down = nn.Linear(d, bottleneck)
        self.up = nn.Linear(bottleneck, d)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = scale
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)
        if init == "houlsby":
            for w in (self.down.weight, self.up.weight):
                nn.init.trunc_normal_(w, std=1e-2, a=-2e-2, b=2e-2)
        elif init == "bert":
            nn.init.normal_(self.down.weight, std=0.02)
            nn.init.zeros_(self.up.weight)
        elif init == "lora":
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
        else:
            raise ValueError(f"unknown init {init!r}")

    def forward(self, h):  # (..., d) -> (..., d)
        return self.up(self.dropout(self.act(self.down(h)))) * self.scale


class Scale(nn.Module):
    """A learned vector l, initialised to ones: the site's tensor is multiplied by it ((IA)^3, Liu et al. 2022)."""

    def __init__(self, features: int):
        super().__init__()
        self.l = nn.Parameter(torch.ones(features))

    def forward(self, h):
        return h * self.l


class PrefixReparam(nn.Module):
    """P = MLP(P') for every attention module at once (Li & Liang 2021, §4.3): one embedding P'
    (length, d) and one tanh MLP whose output holds every layer's prefix keys and values.

    Shared by the adapter's PrefixTables (registered once, in the adapter's container) and used
    only during training: folding turns each layer's slice into a plain table.
    """

    def __init__(self, length: int, d_model: int, hidden: int, sites: int, width: int):
        super().__init__()
        self.length, self.sites, self.width = length, sites, width
        self.embedding = nn.Parameter(torch.randn(length, d_model))
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.Tanh(), nn.Linear(hidden, sites * width))
        self.memo = None  # ((pass, grad mode, parameter versions), output) of the current pass

    def forward(self, memo: bool = True) -> torch.Tensor:  # -> (sites, length, width)
        # One evaluation (and one graph) per forward pass, shared by every layer; recomputed when
        # a new pass starts, the grad mode differs or the parameters changed in place (a step).
        key = (PassClock.now, torch.is_grad_enabled(), tuple(p._version for p in self.parameters()))
        if memo and self.memo is not None and self.memo[0] == key:
            return self.memo[1]
        out = self.mlp(self.embedding).view(self.length, self.sites, self.width).transpose(0, 1)
        self.memo = (key, out) if memo else None
        return out

    def begin_pass(self) -> None:
        self()

    def folded_state(self) -> dict:
        return {}  # nothing of it is kept once folded


class PrefixTable(nn.Module):
    """Trainable keys and values prepended to one attention module's (Li & Liang 2021).

    Either a plain (length, 2 * kv_heads * head_dim) table, or, during training, slice ``index`` of
    a shared ``PrefixReparam``. ``fold()`` computes the slice once and drops the reparameterisation,
    so a saved adapter holds only the tables.
    """

    def __init__(self, length: int, kv_heads: int, head_dim: int, reparam: PrefixReparam | None = None, index: int = 0):
        super().__init__()
        self.length, self.kv_heads, self.head_dim, self.index = length, kv_heads, head_dim, index
        object.__setattr__(self, "reparam", reparam)  # not a submodule: the adapter registers it once
        self.shared = {"prefix": reparam} if reparam is not None else {}
        self.table = None if reparam is not None else nn.Parameter(torch.randn(length, 2 * kv_heads * head_dim) * 0.02)

    def flat(self, memo: bool = True) -> torch.Tensor:  # (length, 2 * kv_heads * head_dim)
        return self.table if self.reparam is None else self.reparam(memo)[self.index]

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values, each (kv_heads, length, head_dim); from the reparameterisation's output
        of this forward pass (see PrefixReparam), never from an earlier one."""
        kv = self.flat().view(self.length, 2, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return kv[0], kv[1]

    def folded_state(self) -> dict[str, torch.Tensor]:
        """The state of the folded form (table only), computed without changing this module."""
        with torch.no_grad():
            return {"table": self.flat(memo=False).detach()}

    @torch.no_grad()
    def fold(self) -> None:
        if self.reparam is None:
            return
        requires_grad = self.reparam.embedding.requires_grad
        self.table = nn.Parameter(self.flat(memo=False).detach().clone(), requires_grad=requires_grad)
        object.__setattr__(self, "reparam", None)
        self.shared = {}


class SoftPrompt(nn.Module):
    """``length`` trainable input vectors prepended to the token embeddings (Lester et al. 2021).

    Called with the batch's input embeddings (B, T, d) and attention mask (B, T), as every prompt
    delta is (an input-dependent prompt reads them); this one returns the same (length, d) table."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.prompt = nn.Parameter(init.detach().clone())  # (length, d)

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # -> (length, d)
        return self.prompt


class Gate(nn.Module):
    """A learned per-example scalar in (0, 1): g = mean over tokens of sigmoid(w . x + b), from the
    hidden states x (B, T, d) the gate reads (UniPELT, Mao et al. 2022, §3). Default Linear init."""

    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, 1, 1)
        return torch.sigmoid(self.proj(x)).mean(dim=-2, keepdim=True)


class Gated(nn.Module):
    """A delta scaled per example by a Gate that reads the same input: gate(x) * delta(x).

    For deltas that are applied to a site's input or output (LoRA, adapters). Not mergeable: the
    gate depends on the input. ``PrefixGated`` is the prefix-attention form."""

    def __init__(self, delta: nn.Module, d: int):
        super().__init__()
        self.delta, self.gate = delta, Gate(d)

    def forward(self, x):
        return self.gate(x) * self.delta(x)


class PrefixGated(nn.Module):
    """UniPELT's prefix gate: P_K <- G_P P_K, P_V <- G_P P_V with G_P read from the attention input h
    (the placement's source), so each example gets its own scaled prefix (B, kv_heads, L, hd)."""

    def __init__(self, table: nn.Module, d: int):
        super().__init__()
        self.table, self.gate = table, Gate(d)
        self.shared = getattr(table, "shared", {})

    def forward(self, h):
        keys, values = self.table()  # (kv_heads, L, hd) each
        g = self.gate(h)[..., None]  # (B, 1, 1, 1)
        return g * keys.unsqueeze(0), g * values.unsqueeze(0)

    def folded_state(self) -> dict:
        gate = {f"gate.{k}": v.detach() for k, v in self.gate.state_dict().items()}
        return {**{f"table.{k}": v for k, v in self.table.folded_state().items()}, **gate}

    def fold(self) -> None:
        self.table.fold()
        self.shared = {}


class Sparse(nn.Module):
    """A sparse delta on a base weight: W + S, where S holds trainable ``values`` at fixed flat
    ``indices`` of the (out, in) weight (SIFT, DSEE's sparse part). Saved compactly (indices +
    values); ``delta_weight`` scatters them into a dense (out, in) matrix, so merging is exact.

    ``bias``: optionally a sparse change of the projection's bias as well (SIFT trains a share of
    the q/k/v/o biases), itself a Sparse over the bias seen as an (out, 1) column, so that its
    positions are saved and checked like the weight's."""

    def __init__(self, shape: tuple[int, int], indices: torch.Tensor, values: torch.Tensor | None = None,
                 bias: Sparse | None = None):
        super().__init__()
        self.shape = tuple(shape)
        self.register_buffer("indices", indices.to(torch.long).flatten())
        self.values = nn.Parameter(torch.zeros(self.indices.numel()) if values is None else values.detach().clone())
        self.bias = bias

    def delta_weight(self) -> torch.Tensor:  # (out, in)
        dense = self.values.new_zeros(self.shape[0] * self.shape[1])
        return dense.index_put((self.indices,), self.values, accumulate=False).view(self.shape)

    def delta_bias(self) -> torch.Tensor | None:  # (out,)
        return None if self.bias is None else self.bias.delta_weight().view(-1)

    def forward(self, x):  # (..., in) -> (..., out)
        return F.linear(x, self.delta_weight(), self.delta_bias())


class WeightDelta(nn.Module):
    """Base of a delta that is a weight update dW (out, in) built from its own parameters each pass (LoHa's
    Hadamard product, LoKr's Kronecker product, FourierFT's spectrum): delta(x) = dW x, ``delta_weight()``
    folds it. Subclasses give ``delta_weight()`` and may override ``apply(x)`` (a cheaper product than the
    dense one) and ``row_mask(out)`` (LyCORIS's rank dropout: output rows of dW dropped while training).
    ``module_dropout``: the probability that the whole delta is skipped in a training pass (LyCORIS)."""

    module_dropout = 0.0

    def apply(self, x):  # (..., in) -> (..., out), before the row mask
        return F.linear(x, self.delta_weight().to(x.dtype))

    def row_mask(self, out: int) -> torch.Tensor | None:
        return None

    def forward(self, x):
        if self.training and self.module_dropout > 0 and not float(torch.rand(1)) > self.module_dropout:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        y = self.apply(x)
        mask = self.row_mask(self.out_features) if self.training else None
        return y if mask is None else y * mask.to(y.dtype)


# ---------------------------------------------------------------- Kronecker / PHM (Compacter, KAdaptation)

class KroneckerRule(nn.Module):
    """The shared "slow" matrices A_1..A_n (each n x n) of a sum of Kronecker products, one module
    for every layer that uses them (registered once per adapter as ``shared~<name>``).

    ``factorized=False``: A is a free (n, n, n) tensor, N(0, std) (Compacter's phm_rule, std 1e-4).
    ``factorized=True``: A_i = u_i v_i^T, u and v ~ U(-init, init) (KAdaptation's slow weights).
    """

    def __init__(self, n: int, factorized: bool = False, init: float = 1e-4):
        super().__init__()
        self.n, self.factorized = n, factorized
        if factorized:
            self.u = nn.Parameter(torch.empty(n, n).uniform_(-init, init))  # (n summands, n)
            self.v = nn.Parameter(torch.empty(n, n).uniform_(-init, init))
        else:
            self.A = nn.Parameter(torch.randn(n, n, n) * init)

    def forward(self) -> torch.Tensor:  # (n, n, n): A[i] is the i-th n x n matrix
        return torch.einsum("ia,ic->iac", self.u, self.v) if self.factorized else self.A


def kronecker_sum(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """H = sum_i A_i (x) B_i for A (n, a, c) and B (n, k, l): an (a*k, c*l) matrix."""
    n, a, c = A.shape
    _, k, l = B.shape
    return torch.einsum("iac,ikl->akcl", A, B).reshape(a * k, c * l)


class KroneckerLinear(nn.Module):
    """y = scale * x H + b with H = sum_i A_i (x) B_i, an (in, out) matrix built from the shared
    slow A_i (a ``KroneckerRule``) and per-layer fast B_i = s_i t_i^T (rank 1, (in/n) x (out/n)).

    The PHM layer of Compacter (Karimi Mahabadi et al. 2021, §3) and KAdaptation's update of W_q,
    W_v (He et al. 2023). ``init``: 'glorot' (both fast factors Glorot-uniform: Compacter) or
    'zero_right' (s Glorot-uniform, t zero, so H = 0 and training starts at the base model);
    ``gain``: the Glorot gain of the fast factors (the Compacter code's glorot_uniform uses sqrt(2)).
    ``dropout`` drops entries of H during training (KAdaptation's Dropout(0.5) on H).
    Linear, so it exposes ``delta_weight`` / ``delta_bias`` and merges into the base weight.
    """

    def __init__(self, in_features: int, out_features: int, rule: KroneckerRule, name: str, scale: float = 1.0,
                 bias: bool = True, init: str = "glorot", dropout: float = 0.0, gain: float = 1.0):
        super().__init__()
        n = rule.n
        if in_features % n or out_features % n:
            raise ValueError(f"n={n} must divide both widths ({in_features}, {out_features})")
        self.scale = scale
        self.left = nn.Parameter(torch.empty(n, in_features // n))  # s_i
        self.right = nn.Parameter(torch.empty(n, out_features // n))  # t_i
        for i in range(n):  # Glorot-uniform per rank-1 factor, as (k, 1) and (1, l) matrices
            nn.init.xavier_uniform_(self.left.data[i].view(-1, 1), gain=gain)
            nn.init.xavier_uniform_(self.right.data[i].view(1, -1), gain=gain)
        if init == "zero_right":
            nn.init.zeros_(self.right)
        elif init != "glorot":
            raise ValueError(f"unknown init {init!r}")
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        object.__setattr__(self, "rule", rule)  # not a submodule: the adapter registers it once
        self.shared = {name: rule}

    def matrix(self) -> torch.Tensor:  # H: (in, out)
        B = torch.einsum("ik,il->ikl", self.left, self.right)
        return kronecker_sum(self.rule(), B)

    def forward(self, x):  # (..., in) -> (..., out)
        y = x @ self.dropout(self.matrix()).to(x.dtype) * self.scale
        return y if self.bias is None else y + self.bias

    def delta_weight(self) -> torch.Tensor:  # (out, in)
        return self.matrix().t() * self.scale

    def delta_bias(self) -> torch.Tensor | None:
        return self.bias


class PHMAdapter(nn.Module):
    """Compacter's adapter: h -> up_PHM(act(down_PHM(h))), both projections ``KroneckerLinear``
    sharing one ``KroneckerRule`` (Karimi Mahabadi et al. 2021, §3-4)."""

    def __init__(self, d: int, bottleneck: int, rule: KroneckerRule, name: str, activation: str = "gelu",
                 gain: float = 1.0):
        super().__init__()
        self.down = KroneckerLinear(d, bottleneck, rule, name, gain=gain)  # gain: of the fast factors' Glorot init
        self.up = KroneckerLinear(bottleneck, d, rule, name, gain=gain)
        self.act = nn.GELU(approximate="tanh") if activation == "gelu_new" else ACTIVATIONS[activation]()
        self.shared = {name: rule}

    def forward(self, h):  # (..., d) -> (..., d)
        return self.up(self.act(self.down(h)))


# ---------------------------------------------------------------- small wrappers and input-dependent deltas

class Scaled(nn.Module):
    """scale * delta(x), for a linear delta (keeps ``delta_weight``): DSEE's alpha / r on its sparse part."""

    def __init__(self, delta: nn.Module, scale: float):
        super().__init__()
        self.delta, self.scale = delta, scale

    def forward(self, x):
        return self.delta(x) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return self.delta.delta_weight() * self.scale


class DynamicLowRank(nn.Module):
    """delta(x) = scale * U diag(g(x)) V x with g(x) = 1 + tanh(G x + c), per token.

    An input-conditioned low-rank reparameterisation (TARP, Hou et al. 2022, as the abstract
    describes it). V (r, in) kaiming-uniform, U (out, r) zero, G and c zero: g = 1 and delta = 0
    at init, so training starts at the base model and the static part is LoRA. Not mergeable.
    """

    def __init__(self, in_features: int, out_features: int, r: int, scale: float):
        super().__init__()
        self.V = nn.Parameter(torch.empty(r, in_features))
        self.U = nn.Parameter(torch.zeros(out_features, r))
        self.G = nn.Parameter(torch.zeros(r, in_features))
        self.c = nn.Parameter(torch.zeros(r))
        nn.init.kaiming_uniform_(self.V, a=math.sqrt(5))
        self.scale = scale

    def forward(self, x):  # (..., in) -> (..., out)
        g = 1 + torch.tanh(F.linear(x, self.G, self.c))  # (..., r)
        return F.linear(F.linear(x, self.V) * g, self.U) * self.scale


class PromptMixture(nn.Module):
    """ATTEMPT's input-dependent prompt (Asai et al. 2022, §3): frozen source prompts P_1..P_t and a
    trainable target prompt, mixed per input by attention.

    x = max-pool of the input embeddings over real tokens; H = LN(W_up SiLU(W_down x)) (LN without
    trainable parameters); a = softmax_j(maxpool(P_j) . H / T) over [sources..., target];
    P = P_target + sum_j a_j P_j, one (length, d) prompt per row.
    """

    def __init__(self, sources: torch.Tensor, target: torch.Tensor, hidden: int, temperature: float):
        super().__init__()
        d = target.shape[-1]
        self.register_buffer("sources", sources.detach().clone())  # (t, length, d), frozen
        self.prompt = nn.Parameter(target.detach().clone())  # (length, d)
        self.down = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(hidden, d, bias=False)
        self.temperature = temperature

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # -> (B, length, d)
        real = mask.bool()[..., None]
        low = torch.finfo(embeds.dtype).min
        x = embeds.masked_fill(~real, low).max(dim=1).values  # (B, d)
        x = torch.where(real.any(dim=1), x, torch.zeros_like(x))  # a row of padding only: zero summary
        h = F.layer_norm(self.up(F.silu(self.down(x))), (x.shape[-1],))  # (B, d)
        prompts = torch.cat([self.sources.to(self.prompt.dtype), self.prompt[None]], dim=0)  # (t+1, L, d)
        keys = prompts.max(dim=1).values  # (t+1, d)
        a = torch.softmax(h @ keys.t() / self.temperature, dim=-1)  # (B, t+1)
        return self.prompt[None] + torch.einsum("bj,jld->bld", a, prompts)


# ---------------------------------------------------------------- VeRA and AdaLoRA's low-rank forms

class RandomProjections(nn.Module):
    """The frozen random A (r, in_max) and B (out_max, r) that every layer of a VeRA adapter shares
    (Kopiczko et al. 2024, §3.1), registered once per adapter as ``shared~<name>``; a layer uses A[:, :in]
    and B[:out]. Kaiming-uniform (gain sqrt 2, fan-in) from a CPU generator seeded with ``seed``, A then B,
    as peft draws them for its projection_prng_key, so the same seed gives the same matrices in both.
    ``persistent=False``: not saved with the adapter (drawn again from the seed when it is loaded)."""

    def __init__(self, r: int, in_max: int, out_max: int, seed: int, persistent: bool = True):
        super().__init__()
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.register_buffer("A", self._draw((r, in_max), g), persistent=persistent)
        self.register_buffer("B", self._draw((out_max, r), g), persistent=persistent)

    @staticmethod
    def _draw(shape, g):
        bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))  # kaiming-uniform: sqrt(3) x gain / sqrt(fan_in)
        return torch.empty(shape).uniform_(-bound, bound, generator=g)


class ScaledRandom(nn.Module):
    """delta(x) = b * (B (d * (A dropout(x)))): VeRA's update Λ_b B Λ_d A (Kopiczko et al. 2024, §3.1), with
    A, B slices of the shared frozen ``RandomProjections`` and trained vectors d (r,) = d_initial, b (out,) = 0
    at init (§3.2), so training starts at the base model. Linear: ``delta_weight`` (out, in) folds it."""

    def __init__(self, in_features: int, out_features: int, projections: RandomProjections, name: str,
                 d_initial: float = 0.1, dropout: float = 0.0):
        super().__init__()
        r = projections.A.shape[0]
        self.in_features, self.out_features = in_features, out_features
        self.d = nn.Parameter(torch.full((r,), float(d_initial)))
        self.b = nn.Parameter(torch.zeros(out_features))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        object.__setattr__(self, "projections", projections)  # not a submodule: the adapter registers it once
        self.shared = {name: projections}

    def forward(self, x):  # (..., in) -> (..., out)
        A, B = self.projections.A[:, :self.in_features], self.projections.B[:self.out_features]
        return self.b * F.linear(self.d * F.linear(self.dropout(x), A.to(x.dtype)), B.to(x.dtype))

    def delta_weight(self) -> torch.Tensor:  # (out, in)
        A, B = self.projections.A[:, :self.in_features], self.projections.B[:self.out_features]
        return (self.b[:, None] * B) @ (self.d[:, None] * A)


class SVDLowRank(nn.Module):
    """delta(x) = scale * P diag(lambda) Q dropout(x): AdaLoRA's SVD-form update (Zhang et al. 2023, §3.1),
    Q = A (r, in), lambda = E (r, 1), P = B (out, r); A, B ~ N(0, 0.02) and E = 0 at init (so training
    starts at the base model), scale = alpha / (r + 1e-5) with r the initial rank (as peft's ranknum: it
    stays r when triplets are pruned, by zeroing their E). Linear: ``delta_weight`` folds it."""

    def __init__(self, in_features: int, out_features: int, r: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.A = nn.Parameter(torch.randn(r, in_features) * 0.02)
        self.E = nn.Parameter(torch.zeros(r, 1))
        self.B = nn.Parameter(torch.randn(out_features, r) * 0.02)
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):  # (..., in) -> (..., out)
        return F.linear(F.linear(self.dropout(x), self.A * self.E), self.B) * self.scale

    def delta_weight(self) -> torch.Tensor:  # (out, in)
        return self.B @ (self.A * self.E) * self.scale


# ---------------------------------------------------------------- prompt relatives and representation edits

class PromptEncoder(nn.Module):
    """P-tuning's prompt (Liu et al. 2021, "GPT Understands, Too", §3): trainable input vectors e (length, d),
    ~ N(0, 1) as nn.Embedding, mapped to the prompt by an encoder: 'lstm' (the paper's), a bidirectional
    two-layer LSTM then a ReLU MLP, h = MLP([LSTM_fwd(e); LSTM_bwd(e)]); 'mlp' (peft's default), three ReLU
    linear layers; 'none', a plain table (what a saved adapter holds). Called as a prompt delta (with the batch's
    embeddings and mask, which it does not read); returns (length, d). ``fold()`` keeps the encoder's output as
    the table, so a saved adapter holds only the prompt."""

    def __init__(self, length: int, d: int, encoder: str = "lstm", hidden: int = 0, dropout: float = 0.0):
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(length, d)) if encoder == "none" else None
        if encoder == "none":
            return
        self.embedding = nn.Parameter(torch.randn(length, d))
        if encoder == "lstm":  # width per direction: d / 2 by default, as the paper's code (peft's encoder_hidden_size)
            h = hidden or max(1, d // 2)
            self.lstm = nn.LSTM(d, h, num_layers=2, dropout=dropout, bidirectional=True, batch_first=True)
            self.head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        elif encoder == "mlp":
            h = hidden or d
            self.lstm = None
            self.head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))
        else:
            raise ValueError(f"unknown encoder {encoder!r}")

    def table(self) -> torch.Tensor:  # (length, d)
        if self.prompt is not None:
            return self.prompt
        e = self.embedding
        if self.lstm is not None:
            e = self.lstm(e.unsqueeze(0))[0].squeeze(0)  # (length, 2h)
        return self.head(e)

    def forward(self, embeds=None, mask=None) -> torch.Tensor:
        return self.table()

    def folded_state(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"prompt": self.table().detach()}

    @torch.no_grad()
    def fold(self) -> None:
        if self.prompt is not None:
            return
        requires_grad = self.embedding.requires_grad
        table = self.table().detach().clone()
        del self.embedding, self.lstm, self.head
        self.prompt = nn.Parameter(table, requires_grad=requires_grad)


class AdaptionPrompt(nn.Module):
    """LLaMA-Adapter's adaption prompt at one attention (Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning
    of Language Models with Zero-init Attention", §3.1-3.2): P (length, d) ~ N(0, 1) (the official code's
    nn.Embedding) and a gate g = 0, so training starts at the base model. Its keys and values are the layer's own
    frozen key and value projections of P, without a position (the prompt has none). ``projections``: the
    (module, output slice) of the key and of the value projection; forward -> keys, values (kv_heads, length, hd)."""

    def __init__(self, length: int, d: int, kv_heads: int, head_dim: int, projections):
        super().__init__()
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.prompt = nn.Parameter(torch.randn(length, d))
        self.gate = nn.Parameter(torch.zeros(1))
        object.__setattr__(self, "projections", projections)  # the base model's modules, not this delta's

    def _project(self, module, rows) -> torch.Tensor:  # (length, d) -> (kv_heads, length, hd)
        from .sites import weight_out_in

        a, b = rows or (0, None)
        weight, bias = weight_out_in(module)[a:b], getattr(module, "bias", None)
        # the frozen weights directly: another adapter's hooks on the projection serve the batch's rows, not P's
        y = F.linear(self.prompt.to(weight.dtype), weight, None if bias is None else bias[a:b])
        return y.view(-1, self.kv_heads, self.head_dim).transpose(0, 1)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        (k_module, k_rows), (v_module, v_rows) = self.projections
        return self._project(k_module, k_rows), self._project(v_module, v_rows)


class TokenRows(nn.Module):
    """Trainable values of chosen rows of a token embedding matrix E (V, d) (trainable tokens, as peft's
    TrainableTokens): ``rows`` (n, d), starting at E[ids] so that training starts at the base model. One per
    adapter (``shared~tokens``), read by every module that holds E (``RowsOf``): the input embedding, and an LM
    head or a decoder's embedding tied to it. ``ids`` and the lookup ``position`` (V,) come from the options."""

    def __init__(self, weight: torch.Tensor, ids: list[int]):
        super().__init__()
        index = torch.tensor(ids, dtype=torch.long, device=weight.device)
        position = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
        position[index] = torch.arange(len(ids), device=weight.device)
        self.register_buffer("ids", index, persistent=False)
        self.register_buffer("position", position, persistent=False)
        self.rows = nn.Parameter(weight.detach()[index].clone())


class RowsOf(nn.Module):
    """One module's view of the adapter's ``TokenRows`` (the combine ``ReplaceRows`` reads it): ``scale``, the
    factor an embedding applies to its output (BART's scaled embeddings); ``foldable=False`` for the modules whose
    weight is the same tensor as one that folds them already (a tied head)."""

    def __init__(self, tokens: TokenRows, name: str, scale: float = 1.0, foldable: bool = True):
        super().__init__()
        object.__setattr__(self, "tokens", tokens)  # not a submodule: the adapter registers it once
        self.shared = {name: tokens}
        self.scale, self.foldable = scale, foldable


class LowRankIntervention(nn.Module):
    """LoReFT (Wu et al. 2024, "ReFT: Representation Finetuning for Language Models", §3, eq. 2):
    phi(h) = h + R^T (W h + b - R h) at chosen positions, R (r, d) with orthonormal rows, W (r, d), b (r,).

    R is trained as a free matrix and used orthonormalised, Q = L^-1 R with L L^T = R R^T (Cholesky, that is
    Gram-Schmidt on its rows, which leaves rows that are orthonormal already as they are); it starts orthonormal
    (torch's orthogonal_, as pyreft), W and b start as nn.Linear's. The positions are each row's first ``first``
    and last ``last`` real tokens, each at most half of the row's tokens (pyreft's get_intervention_locations),
    read from the attention mask; ``part`` 'first' or 'last' keeps one side (untied weights), 'both' all.
    ``dropout`` drops entries of the edit R^T (...) while training."""

    def __init__(self, d: int, r: int, first: int, last: int, part: str = "both", dropout: float = 0.0):
        super().__init__()
        self.R = nn.Parameter(nn.init.orthogonal_(torch.empty(r, d)))
        source = nn.Linear(d, r)
        self.W = nn.Parameter(source.weight.detach().clone())
        self.b = nn.Parameter(source.bias.detach().clone())
        self.first, self.last, self.part = first, last, part
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def basis(self) -> torch.Tensor:  # Q (r, d): R with orthonormal rows, computed in float32
        with torch.autocast(self.R.device.type, enabled=False):
            R = self.R.float()
            L = torch.linalg.cholesky(R @ R.t())
            return torch.linalg.solve_triangular(L, R, upper=False)

    def chosen(self, mask: torch.Tensor | None, shape) -> torch.Tensor | None:
        """(B, T) bool: the positions this intervention edits; None where it edits none (a continuation)."""
        batch, length = shape
        if mask is None:
            real = torch.ones(batch, length, dtype=torch.bool, device=self.R.device)
        elif mask.shape[1] > length:  # new tokens after a key/value cache: the chosen ones were all in the prompt
            return None
        elif mask.shape[1] < length:
            from .errors import ConfigError
            raise ConfigError(f"LoReFT got hidden states of {length} positions but a mask of {mask.shape[1]}: an "
                              "adapter that adds positions to the input (a prompt) runs in the same model; "
                              "use LoReFT without it")
        else:
            real = mask.bool()
        n = real.sum(dim=1, keepdim=True)  # (B, 1) tokens per row
        rank = real.cumsum(dim=1) - 1  # (B, T): each real token's index among its row's tokens
        first = torch.clamp(n // 2, max=self.first)
        last = torch.clamp(n // 2, max=self.last)
        at_first, at_last = real & (rank < first), real & (rank >= n - last)
        return at_first if self.part == "first" else at_last if self.part == "last" else at_first | at_last

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:  # h (B, T, d)
        chosen = self.chosen(mask, h.shape[:2])
        if chosen is None:
            return h
        Q = self.basis().to(h.dtype)
        low = F.linear(h, self.W.to(h.dtype), self.b.to(h.dtype)) - F.linear(h, Q)  # (B, T, r): W h + b - R h
        edit = self.dropout(F.linear(low, Q.t()))  # (B, T, d)
        return torch.where(chosen[..., None], h + edit, h)

    def folded_state(self) -> dict[str, torch.Tensor]:
        """R as it is used (orthonormal rows), so a saved adapter holds a valid R."""
        with torch.no_grad():
            return {"R": self.basis().to(self.R.dtype), "W": self.W.detach(), "b": self.b.detach()}
