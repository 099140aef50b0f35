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


class LowRank(nn.Module):
    """delta(x) = scale * B A dropout(x): A (r, in), B (out, r); B = 0 so training starts at the base model (LoRA, Hu et al. 2021)."""

    def __init__(self, in_features: int, out_features: int, r: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # loralib's init (METHODS.md §15)
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):  # x: (..., in) -> (..., out)
        return F.linear(F.linear(self.dropout(x), self.A), self.B) * self.scale

    def delta_weight(self) -> torch.Tensor:  # (out, in)
        return (self.B @ self.A) * self.scale

    def add_to(self, out, x):
        """out + delta(x) with the scale and the sum fused into one addmm (in place when no graph is
        recorded): the unfused form costs two extra passes over ``out``, most of LoRA's overhead."""
        h = F.linear(self.dropout(x), self.A)
        if not out.dtype == h.dtype == self.B.dtype or not out.is_contiguous():  # autocast; a fused slice
            return out + (F.linear(h, self.B) * self.scale).to(out.dtype)
        flat, h = out.view(-1, out.shape[-1]), h.reshape(-1, h.shape[-1])
        if torch.is_grad_enabled():
            return torch.addmm(flat, h, self.B.t(), alpha=self.scale).view(out.shape)
        return flat.addmm_(h, self.B.t(), alpha=self.scale).view(out.shape)


class Bottleneck(nn.Module):
    """delta(h) = scale * W_up act(W_down h + b_down) + b_up: the adapter of Houlsby et al. 2019 and its kin.

    ``init``: 'houlsby' (both projections N(0, 1e-2) truncated at 2 sigma: near identity),
    'bert' (N(0, 0.02) down, zero up: exactly identity), 'lora' (kaiming-uniform down, zero up; He et al.'s PA).
    """

    def __init__(self, d: int, bottleneck: int, activation: str = "relu", init: str = "bert", scale: float = 1.0):
        super().__init__()
        self.down = nn.Linear(d, bottleneck)
        self.up = nn.Linear(bottleneck, d)
        self.act = ACTIVATIONS[activation]()
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
        return self.up(self.act(self.down(h))) * self.scale


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
    values); ``delta_weight`` scatters them into a dense (out, in) matrix, so merging is exact."""

    def __init__(self, shape: tuple[int, int], indices: torch.Tensor, values: torch.Tensor | None = None):
        super().__init__()
        self.shape = tuple(shape)
        self.register_buffer("indices", indices.to(torch.long).flatten())
        self.values = nn.Parameter(torch.zeros(self.indices.numel()) if values is None else values.detach().clone())

    def delta_weight(self) -> torch.Tensor:  # (out, in)
        dense = self.values.new_zeros(self.shape[0] * self.shape[1])
        return dense.index_put((self.indices,), self.values, accumulate=False).view(self.shape)

    def forward(self, x):  # (..., in) -> (..., out)
        return F.linear(x, self.delta_weight())


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
    'zero_right' (s Glorot-uniform, t zero, so H = 0 and training starts at the base model).
    ``dropout`` drops entries of H during training (KAdaptation's Dropout(0.5) on H).
    Linear, so it exposes ``delta_weight`` / ``delta_bias`` and merges into the base weight.
    """

    def __init__(self, in_features: int, out_features: int, rule: KroneckerRule, name: str, scale: float = 1.0,
                 bias: bool = True, init: str = "glorot", dropout: float = 0.0):
        super().__init__()
        n = rule.n
        if in_features % n or out_features % n:
            raise ValueError(f"n={n} must divide both widths ({in_features}, {out_features})")
        self.scale = scale
        self.left = nn.Parameter(torch.empty(n, in_features // n))  # s_i
        self.right = nn.Parameter(torch.empty(n, out_features // n))  # t_i
        for i in range(n):  # Glorot-uniform per rank-1 factor, as (k, 1) and (1, l) matrices
            nn.init.xavier_uniform_(self.left.data[i].view(-1, 1))
            nn.init.xavier_uniform_(self.right.data[i].view(1, -1))
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

    def __init__(self, d: int, bottleneck: int, rule: KroneckerRule, name: str, activation: str = "gelu"):
        super().__init__()
        self.down = KroneckerLinear(d, bottleneck, rule, name)
        self.up = KroneckerLinear(bottleneck, d, rule, name)
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
