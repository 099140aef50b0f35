import hashlib

import torch

from ..combine import PARALLEL
from ..deltas import LowRank, Scaled, Sparse
from ..errors import ConfigError
from ..registry import Method, Placement, option, register
from ..sites import target_features, weight_out_in
from ..store import record, require_store

# The low-rank + sparse split W0 ~ U V + S (METHODS.md §4; the grebsmo branch of run_glue.py in the
# DSEE repo): the released loop runs ROUNDS rounds of INNER alternations and adds STEP rank components
# per round (so it ends at rank 1 + 5 * 99 = 496); entries of S under TAU are hard-zeroed. The fast
# stand-in ('grebsmo', the default) starts from the top-r singular vectors, r = min(FAST_RANK,
# min(out, in) // 8), and alternates FAST_INNER times.
ROUNDS, INNER, STEP, TAU = 100, 2, 5, 0.01
FAST_RANK, FAST_INNER = 101, 10
_SUPPORTS: dict = {}  # (weight digest, options) -> flat indices; attach and load in one process agree


def _alternate(W, S, V):
    """One GreBsmo alternation (Zhou & Tao 2013): U = orth((W - S) V^T), V = U^T (W - S),
    S = hard(W - U V, TAU). W (out, in), V (r, in) -> U (out, r), V (r, in), S (out, in)."""
    U = torch.linalg.qr((W - S) @ V.t()).Q
    V = U.t() @ (W - S)
    S = W - U @ V
    S[S.abs() < TAU] = 0
    return U, V, S


def grebsmo(W: torch.Tensor) -> torch.Tensor:
    """S of W ~ U V + S, fast: V starts as the top-r right singular vectors of W, r =
    min(FAST_RANK, min(out, in) // 8) (96 on BERT-base: never so large that the low-rank part also
    absorbs the sparse outliers of a small matrix), then FAST_INNER alternations at that rank.
    A stand-in for the released greedy loop (``grebsmo_released``), which ends at rank 496 on
    768-wide weights: the two supports are not the same."""
    W = W.detach().float().cpu()
    r = max(1, min(FAST_RANK, min(W.shape) // 8))
    V = torch.linalg.svd(W, full_matrices=False).Vh[:r]  # (r, in)
    S = torch.zeros_like(W)
    for _ in range(FAST_INNER):
        _, V, S = _alternate(W, S, V)
    return S


def grebsmo_released(W: torch.Tensor, seed: int = 0, rounds: int = ROUNDS) -> torch.Tensor:
    """S of W ~ U V + S by the released DSEE loop (run_glue.py, sparse_method 'grebsmo'): U (out, 1)
    and V (1, in) start N(0, 1) (from ``seed``; the released code draws them from the global RNG);
    each of ``rounds`` rounds restarts S at zero and alternates INNER times, then appends to V the
    first STEP rows of R in the QR factorisation of the residual E = W - U V - S. S of the last
    round (rank 1 + STEP * (ROUNDS - 1) = 496) is returned. Float32 on the CPU: about 3 s for a
    768 x 768 weight on two otherwise idle cores."""
    W = W.detach().float().cpu()
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(W.shape[0], 1, generator=g)
    V = torch.randn(1, W.shape[1], generator=g)
    for i in range(rounds):
        S = torch.zeros_like(W)
        for _ in range(INNER):
            U, V, S = _alternate(W, S, V)
        if i < rounds - 1:  # the released loop grows V after its last round too, unused
            E = W - U @ V - S
            V = torch.cat([V, torch.linalg.qr(E, mode="r").R[:STEP]], 0)
    return S


def support(W: torch.Tensor, num: int, how: str, seed: int) -> torch.Tensor:
    """Flat indices of the ``num`` entries of the (out, in) weight W that DSEE's sparse part may change."""
    W = W.detach().float().cpu()
    key = (hashlib.sha256(W.numpy().tobytes()).hexdigest(), tuple(W.shape), num, how, seed)
    if key not in _SUPPORTS:
        if how == "grebsmo":
            score = grebsmo(W).abs()
        elif how == "grebsmo-released":
            score = grebsmo_released(W, seed).abs()
            found = int((score > 0).sum())
            if found < num:  # the released mask (|S| >= its num-th largest) would then be the whole matrix
                raise ConfigError(
                    f"dsee: support='grebsmo-released' leaves {found} nonzero entries in S of a {W.shape[0]}x"
                    f"{W.shape[1]} weight, fewer than num_sparse={num}: its low-rank part grows to rank "
                    f"{1 + STEP * (ROUNDS - 1)} and absorbs a weight this narrow (the released code then trains "
                    "all of S); use support='grebsmo' (the default) on this model")
        elif how == "svd":  # the residual of the best rank-r approximation (r as in grebsmo), no alternation
            U, s, Vh = torch.linalg.svd(W, full_matrices=False)
            r = max(1, min(FAST_RANK, min(W.shape) // 8))
            score = (W - U[:, :r] @ torch.diag(s[:r]) @ Vh[:r]).abs()
        elif how == "magnitude":
            score = W.abs()
        else:  # random
            score = torch.rand(W.shape, generator=torch.Generator().manual_seed(seed))
        if len(_SUPPORTS) > 512:
            _SUPPORTS.clear()
        _SUPPORTS[key] = torch.topk(score.flatten(), num).indices.sort().values
    return _SUPPORTS[key].clone()


@register
class DSEE(Method):
    """Low-rank plus sparse update of W_q and W_v: W = W0 + (alpha / r) (B A + S (.) M).

    Chen et al. 2023, "DSEE: Dually Sparsity-Embedded Efficient Tuning of Pre-trained Language
    Models" (ACL), §3. The support M (num_sparse entries per matrix) is the top-|S| entries of a
    GreBsmo-style decomposition W0 ~ U V + S of the *pretrained* weight (|S| < 0.01 zeroed).
    ``support``: 'grebsmo-released' runs the released loop (``grebsmo_released``: 100 rounds of 2
    alternations, 5 rank components added per round from the QR of the residual, rank 496 at the
    end; about 3 s per 768 x 768 weight on a CPU, and recomputed when a saved adapter is loaded);
    'grebsmo' (the default) is a fast stand-in (``grebsmo``: an SVD start at rank min(101,
    min(out, in) // 8), 10 alternations), whose support differs from the released one. The default
    stays the stand-in because the released loop's low-rank part absorbs weights narrower than
    about 500 (on MiniLM's 384-wide projections S is exactly 0 from round 70 on, and the released
    mask is then the whole matrix): it is refused there. 'svd', 'magnitude' (the code's omp) and
    'random' (its rp) are offered too. A kaiming-uniform (loralib; DSEE uses N(0, 0.02)), B = 0,
    S = 0. Defaults from the scripts: r = 16, alpha = 32 (scale 2), N = 16, about 590K parameters
    on BERT-base. Mergeable: the low-rank and the sparse part both fold into W.

    The inference-efficiency half is ``prune(model, ratio)`` below: after merging, it zeroes the
    ``ratio`` fraction of the adapted projections' entries with the smallest score, globally over
    all of them; score 'update' is DSEE's ABS mode (|alpha / r (B A + S (.) M)|), 'weight' the
    magnitude of the merged weight. dt.unmerge / dt.detach restore the unpruned base bitwise. Not
    implemented: pruning of the non-adapted key/dense weights, structured head pruning, and the
    fine-tuning round under the pruning masks. The code's WABS merge bug (METHODS.md) is not copied:
    the merge scales both parts by alpha / r, as the forward pass does.
    """

    name = "dsee"
    paper = "Chen et al. 2023, DSEE"
    lr = 5e-4
    combines = (PARALLEL,)
    deviations = ("the default sparse support ('grebsmo') is a fast stand-in for the released GreBsmo loop: an SVD "
                  "start at rank min(101, min(out, in) / 8) and 10 alternations, where the released loop adds 5 "
                  "components per round for 100 rounds and ends at rank 496 (another support); "
                  "support=grebsmo-released runs the released loop (refused on weights narrow enough for it to "
                  "absorb, such as MiniLM's); A is kaiming-uniform (DSEE: N(0, 0.02)); dsee.prune is merge-time "
                  "unstructured pruning of the adapted projections only, without the re-training round")

    r: int = option(16, min=1)
    alpha: float = option(32.0, min=0)
    num_sparse: int = option(16, min=1, help="entries of the sparse update per matrix")
    support: str = option("grebsmo", choices=("grebsmo", "grebsmo-released", "svd", "magnitude", "random"),
                          help="how the sparse support is chosen from the pretrained weight")
    seed: int = option(0)
    sites: list = option(["attn.q", "attn.v"])

    def placements(self, model):
        out = []
        for t in self.targets(model, self.sites):
            d_in, d_out = target_features(t, self.name)
            if self.num_sparse > d_in * d_out:
                raise ConfigError(f"dsee: num_sparse={self.num_sparse} exceeds the {d_in * d_out} entries of {t.name}")
            a, b = t.out_slice or (0, None)
            W0 = weight_out_in(t.module)[a:b]
            sparse = Sparse((d_out, d_in), support(W0, self.num_sparse, self.support, self.seed))
            out.append(Placement(t, LowRank(d_in, d_out, self.r, self.alpha / self.r), PARALLEL))
            out.append(Placement(t, Scaled(sparse, self.alpha / self.r), PARALLEL, suffix="~sparse"))
        return out


@torch.no_grad()
def prune(model, ratio: float = 0.2, score: str = "update", adapter: str | None = None) -> int:
    """DSEE's pruning step for inference: merge the DSEE adapter, then zero the ``ratio`` fraction
    of the entries of its merged projections with the smallest score (global, unstructured).
    Returns the number of entries zeroed; dt.unmerge(model) or dt.detach(model) undo it."""
    from .. import store as S

    if not 0 <= ratio < 1 or score not in ("update", "weight"):
        raise ConfigError(f"dsee.prune: ratio must be in [0, 1) and score 'update' or 'weight', "
                          f"got {ratio!r}, {score!r}")
    st = require_store(model)
    names = [adapter] if adapter is not None else sorted(st.active)
    entries = [e for n in names for e in record(st, n).entries]
    if not entries or any(record(st, n).method.name != "dsee" for n in names):
        raise ConfigError(f"dsee.prune: adapters {names} are not all 'dsee' adapters; pass adapter=NAME")
    S.merge(model, adapter)
    by_module: dict = {}
    for e in entries:
        by_module.setdefault((id(e.target_module), e.out_slice), (e, []))[1].append(e.delta.delta_weight())
    views, scores = [], []
    for e, updates in by_module.values():
        a, b = e.out_slice or (0, None)
        view = weight_out_in(e.target_module)[a:b]
        views.append(view)
        scores.append((sum(updates) if score == "update" else view).abs().float().flatten())
    flat = torch.cat(scores)
    k = int(ratio * flat.numel())
    if k == 0:
        return 0
    threshold = flat.kthvalue(k).values
    zeroed = 0
    for view, s in zip(views, scores):
        cut = (s <= threshold).view(view.shape)
        view.masked_fill_(cut, 0)
        zeroed += int(cut.sum())
    return zeroed
