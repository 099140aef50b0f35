import math
import re
import time
from collections import defaultdict

import torch
from torch import nn

from .. import sites as S
from ..combine import DECOMPOSE, PARALLEL
from ..deltas import EmbeddingLowRank, LowRank
from ..errors import ConfigError
from ..registry import MAX_SIZE, Method, Placement, option, register
from ..sites import target_features, weight_out_in

# peft's init_lora_weights values whose A and B are a plain LoRA's once trained (the base untouched);
# "pissa" and "olora" start from the weight and keep the residual; the rest change the base in ways that
# the original base alone cannot reproduce (a randomised SVD, quantisation, data or gradients).
_PEFT_PLAIN_INITS = {"true", "false", "none", "gaussian", "eva", "orthogonal", "mica"}
# peft LoraConfig fields that turn on a variant with another forward pass than LoRA's (or DoRA's).
_PEFT_VARIANTS = ("lora_bias", "use_qalora", "use_bdlora", "alora_invocation_tokens", "arrow_config", "velora_config",
                  "monteclora_config", "kasa_config", "trainable_token_indices", "layer_replication",
                  "target_parameters")


def principal_factors(weight: torch.Tensor, r: int, scale: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) from a weight (out, in), computed in float32 as peft does.

    'pissa' (Meng et al. 2024, PiSSA, §3): W = U S V^T, A = sqrt(S_r / scale) V_r^T, B = U_r sqrt(S_r / scale),
    so that scale B A is W's principal rank-r part. 'olora' (Büyükakyüz 2024, OLoRA, §3): W = Q R,
    A = R[:r], B = Q[:, :r] (the scale is not divided out, as in the paper and peft)."""
    w = weight.detach().float()
    if init == "pissa":
        U, s, Vh = torch.linalg.svd(w, full_matrices=False)
        root = (s[:r] / scale).sqrt()
        return root[:, None] * Vh[:r], U[:, :r] * root
    Q, R = torch.linalg.qr(w)
    return R[:r].contiguous(), Q[:, :r].contiguous()


def _check_saved_base(peft, name: str, saved: torch.Tensor) -> None:
    """peft saves the weight of a targeted embedding beside its LoRA: accepted where it is this model's own
    weight (nothing to load), refused where it differs (trained, resized), which a LoRA cannot hold."""
    try:
        module = peft.model.get_submodule(peft.full(name))
    except AttributeError:
        raise ConfigError(f"the adapter holds a weight for '{name}', which this model does not have") from None
    own = getattr(module, "weight", None)
    if not isinstance(module, nn.Embedding) or own is None or own.shape != saved.shape or \
            not torch.equal(own.detach().cpu().to(saved.dtype), saved):
        raise ConfigError(f"the adapter holds a changed weight of '{name}' (trained or resized, saved by peft's "
                          "save_embedding_layers), which deltatune's LoRA cannot hold; load it onto the model it "
                          "was saved with, or save the peft adapter with save_embedding_layers=False")


def _tied(model: nn.Module, module: nn.Module) -> bool:
    """Whether ``module``'s weight is also another module's (an LM head tied to the input embedding)."""
    w = module.weight
    return any(p is w for m in model.modules() if m is not module for p in m.parameters(recurse=False))


@register
class LoRA(Method):
    """Low-rank update beside a frozen projection: h = W0 x + (alpha / r) B A x, with B = 0 at init.

    Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", §4.1. A is
    kaiming-uniform (loralib), B zero; applied to W_q and W_v by default; r = 8, alpha = 16 (the
    UniPELT defaults of METHODS.md). Mergeable: W0 += (alpha / r) B A.

    The options peft's LoraConfig has, under its names where they are the same:
    * ``use_rslora``: scale alpha / sqrt(r) (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor", §3).
    * ``use_dora``: DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", §4):
      W' = m (W0 + dW) / ||W0 + dW||, with dW the LoRA update, the norm of each output row (peft's
      convention; the paper's "column" of W^T) treated as a constant in the backward pass (§4.3), and m
      (out,) trained, starting at ||W0||. Folds exactly: W0 <- m (W0 + dW) / ||W0 + dW||, the bias unchanged.
    * ``init`` (peft: ``init_lora_weights``): 'default' (True), 'gaussian' (A ~ N(0, 1/r)), 'pissa'
      (Meng et al. 2024: A, B from the top-r singular triplets of W0) or 'olora' (Büyükakyüz 2024: from
      W0's QR). peft moves the principal part out of the base (W_res = W0 - scale B0 A0); deltatune never
      changes the base: the delta keeps (A0, B0) frozen and computes scale (B A - B0 A0), the same
      function (h = W_res x + scale B A x), so merging, unmerging, detaching and saving stay exact and a
      saved adapter applies to the original base (like peft's save with
      ``path_initial_model_for_weight_conversion``).
    * ``rank_pattern`` / ``alpha_pattern``: a rank / an alpha per module, {key: value}: the key is a site
      name (``attn.v``) or a regular expression matched against the end of the module's name, as peft
      matches it; the first key that matches wins.
    * the site ``embed``: LoRA on the token embedding (A (r, vocab) zero, B (d, r) ~ N(0, 1), as in loralib and
      peft); an embedding whose weight an LM head shares stays unmerged (a fold would change the head too).
    """

    name = "lora"
    paper = "Hu et al. 2021, LoRA"
    lr = 2e-3  # chosen on the validation split at the demo budget: docs/demo/lr-sweep.md
    combines = (PARALLEL, DECOMPOSE)

    r: int = option(8, min=1)
    alpha: float = option(16.0, min=0)
    dropout: float = option(0.0, min=0.0, max=0.99)
    sites: list = option(["attn.q", "attn.v"])
    use_rslora: bool = option(False, help="scale alpha / sqrt(r) (rsLoRA) instead of alpha / r")
    use_dora: bool = option(False, help="DoRA: a trained magnitude per output row times the normalised W + dW")
    init: str = option("default", choices=("default", "gaussian", "pissa", "olora"),
                       help="A, B at init: default (kaiming A, zero B), gaussian, pissa or olora (from the weight)")
    rank_pattern: dict = option({}, help="{site or module-name pattern: rank} for modules that differ from r")
    alpha_pattern: dict = option({}, help="{site or module-name pattern: alpha} for modules that differ from alpha")

    def _plan(self, model) -> list[tuple]:
        """(target, rank, alpha, scale) of every adapted module, the patterns applied."""
        known = S.SITE_MAP.get(S.family_of(model), {})
        deadline = time.monotonic() + S.MATCH_SECONDS

        def value(field, patterns, target, default):
            for key, v in patterns.items():
                if key in known:
                    hit = target.site == key
                else:
                    try:
                        compiled = S._regex(rf"(?:.*\.)?(?:{key})", key)
                    except ConfigError as err:
                        raise ConfigError(f"lora: {field} key {key!r}: {err}") from None
                    hit = S._fullmatch(compiled, target.name, key, deadline) is not None
                if hit:
                    return v
            return default

        plan = []
        for t in self.targets(model, self.sites):
            r = value("rank_pattern", self.rank_pattern, t, self.r)
            alpha = float(value("alpha_pattern", self.alpha_pattern, t, self.alpha))
            plan.append((t, r, alpha, alpha / (math.sqrt(r) if self.use_rslora else r)))
        return plan

    def check(self, model):
        super().check(model)
        for field, patterns in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(patterns, dict):
                raise ConfigError(f"lora: option '{field}' must be a mapping of sites or patterns to values, "
                                  f"got {type(patterns).__name__}")
            for key, v in patterns.items():
                rank = field == "rank_pattern"
                ok = (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_SIZE if rank else
                      isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1e6)
                if not isinstance(key, str) or not key or not ok:
                    want = f"a rank in [1, {MAX_SIZE}]" if rank else "an alpha in [0, 1e6]"
                    raise ConfigError(f"lora: {field} maps {key!r} to {v!r}; keys are sites or patterns (non-empty "
                                      f"text), values {want}")
        for t, r, alpha, scale in self._plan(model):
            if t.site == "embed" and not isinstance(t.module, nn.Embedding):
                raise ConfigError(f"lora: site 'embed' adapts token embeddings (nn.Embedding); {t.name} is a "
                                  f"{type(t.module).__name__}, so leave 'embed' out of sites on this model")
            if isinstance(t.module, nn.Embedding):
                if self.init in ("pissa", "olora"):
                    raise ConfigError(f"lora: init='{self.init}' starts from a projection's weight; the embedding "
                                      f"{t.name} takes init='default' (leave 'embed' out of sites, or change init)")
                continue
            d_in, d_out = target_features(t, self.name)
            if self.init in ("pissa", "olora") and r > min(d_in, d_out):
                raise ConfigError(f"lora: init='{self.init}' takes the top {r} directions of {t.name}'s "
                                  f"{d_out}x{d_in} weight, which has at most {min(d_in, d_out)}; lower r")
            if self.init == "pissa" and scale == 0:
                raise ConfigError("lora: init='pissa' divides the singular values by the scale alpha / r, which "
                                  "is 0 here; give alpha > 0")

    def placements(self, model):
        out = []
        for t, r, _, scale in self._plan(model):
            a, b = t.out_slice or (0, None)
            # (out, in); an embedding's E^T (dim, vocab). Read only where an option needs it: a quantized base
            # holds no float matrix (sites.weight_out_in refuses it, naming the options that read it).
            weight = lambda: weight_out_in(t.module)[a:b]  # noqa: E731
            if isinstance(t.module, nn.Embedding):
                m = t.module
                delta = EmbeddingLowRank(m.num_embeddings, m.embedding_dim, r, scale, padding_idx=m.padding_idx,
                                         embed_scale=float(getattr(m, "embed_scale", 1.0)), foldable=not _tied(model, m))
            else:
                d_in, d_out = target_features(t, self.name)
                delta = LowRank(d_in, d_out, r, scale, self.dropout)
                if self.init == "gaussian":
                    nn.init.normal_(delta.A, std=1 / r)  # peft's 'gaussian'
                elif self.init in ("pissa", "olora"):
                    A, B = principal_factors(weight(), r, scale, self.init)
                    with torch.no_grad():
                        delta.A.copy_(A)
                        delta.B.copy_(B)
                    delta.set_offset()
            if self.use_dora:
                delta.decompose(weight())
            out.append(Placement(t, delta, DECOMPOSE if self.use_dora else PARALLEL))
        return out

    def faster_parameters(self, deltas):
        return [d.B for d in deltas.values() if isinstance(d, LowRank)]

    # -- dt.compose.average: on the weight updates, re-factorised by SVD
    average_rank = True

    @classmethod
    def average(cls, adapters, weights, rank=None):
        """Averaged where LoRA acts, on the weight updates dW_i = (alpha_i / r_i) B_i A_i; the average is
        re-factorised by SVD to ``rank`` (default: the sum of the ranks, which is exact), and the report
        holds the relative Frobenius error of each site (``site_errors``) and of the whole (``error``).
        DoRA adapters are refused: their update is not a sum of weight updates."""
        configs = [cfg for cfg, _ in adapters.values()]
        deltas = [d for _, d in adapters.values()]
        if any(c.use_dora for c in configs):
            raise ConfigError("average: DoRA adapters rescale the weight (m / ||W + dW||), so their updates do not "
                              "average; average plain LoRA adapters, or stack them")
        sites = {tuple(c.sites) for c in configs}
        layers = {tuple(c.layers) if c.layers is not None else None for c in configs}
        if len(sites) != 1 or len(layers) != 1:
            raise ConfigError(f"average: LoRA adapters at different sites or layers ({sorted(map(str, sites | layers))}); "
                              "average adapters trained at the same sites, or stack them")
        keys = list(deltas[0])
        if any(set(d) != set(keys) for d in deltas):
            raise ConfigError("average: the LoRA adapters place deltas at different modules; they cannot be averaged")
        full = sum(max(x.rank for x in d.values()) for d in deltas)
        rank = full if rank is None else int(rank)
        if rank < 1:
            raise ConfigError(f"average: rank must be >= 1, got {rank}")
        states, errors, num, den = {}, {}, 0.0, 0.0
        for key in keys:
            dw = sum(w * d[key].delta_weight().double() for w, d in zip(weights, deltas))  # (out, in)
            U, S_, Vh = torch.linalg.svd(dw, full_matrices=False)
            k = min(rank, S_.numel())
            root = S_[:k].sqrt()
            B = torch.zeros(dw.shape[0], rank, dtype=torch.float64)
            A = torch.zeros(rank, dw.shape[1], dtype=torch.float64)
            B[:, :k], A[:k] = U[:, :k] * root, root[:, None] * Vh[:k]
            approx = B @ A
            err, norm = float((dw - approx).norm() ** 2), float(dw.norm() ** 2)
            num, den = num + err, den + norm
            errors[key] = math.sqrt(err / norm) if norm > 0 else 0.0
            states[key] = {"A": A, "B": B}
        options = {**configs[0].folded_options(), "r": rank, "alpha": float(rank), "dropout": 0.0,  # scale 1
                   "use_rslora": False, "init": "default", "rank_pattern": {}, "alpha_pattern": {}}
        return options, states, {"rank": rank, "exact_rank": full, "error": math.sqrt(num / den) if den > 0 else 0.0,
                                 "site_errors": errors}

    # -- the Hugging Face PEFT format (peft 0.21 LORA); ``peft``: deltatune.formats.peft.Bridge
    peft_type = "LORA"

    def to_peft(self, peft, deltas):
        """``<module>.lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r), scaled by lora_alpha / r; an
        embedding's ``lora_embedding_A`` (r, vocab) and ``lora_embedding_B`` (d, r); DoRA's
        ``lora_magnitude_vector`` (out,).

        GPT-2's q, k and v are slices of one Conv1D, c_attn, which peft can only adapt whole: LoRAs on
        the slices become one LoRA on c_attn whose A stacks theirs and whose B is block-diagonal (zeros
        elsewhere), an exact rewrite with a larger rank (a DoRA magnitude gets the rows' own norms
        elsewhere, where its factor is 1); all modules then share the largest rank (smaller ones are padded
        with zeros), lora_alpha keeps the most common scale and ``alpha_pattern`` the others (rsLoRA's
        scale is written as the same lora_alpha / r). PiSSA and OLoRA adapters are written relative to
        the original base, as a LoRA of twice the rank: B A - B0 A0 = [B, -B0] [A; A0] (what peft's
        ``path_initial_model_for_weight_conversion`` writes), so ``init_lora_weights`` is True.
        """
        scales = {(t.name, t.site.split(".")[-1] if t.out_slice else None): s for t, _, _, s in self._plan(peft.model)}
        per_module: dict[str, list] = defaultdict(list)  # peft name -> [(A, B, scale, magnitude, rows)]
        for module_name, marks, params in deltas:
            A, B = params["A"], params["B"]
            if "A0" in params:
                A, B = torch.cat([A, params["A0"]]), torch.cat([B, -params["B0"]], dim=1)
            rows = peft.fused_rows(module_name, marks[0]) if marks else None
            scale = scales[(module_name, marks[0] if marks else None)]
            per_module[peft.rel(module_name)].append((A, B, scale, params.get("m"), rows))
        rank = max(sum(A.shape[0] for A, *_ in parts) for parts in per_module.values())
        tensors, module_scale = {}, {}
        for name, parts in per_module.items():
            module = peft.root.get_submodule(name)
            embedding = isinstance(module, nn.Embedding)
            weight = weight_out_in(module)  # (out, in)
            scale = parts[0][2]
            A = torch.cat([A for A, *_ in parts], dim=0)
            B = torch.zeros(weight.shape[0], A.shape[0], dtype=parts[0][1].dtype)
            m = torch.linalg.vector_norm(weight.detach().float(), dim=1).to(B.dtype) if self.use_dora else None
            at = 0
            for a, b, s, mag, rows in parts:  # block-diagonal: each A row block feeds only its own B columns
                lo, hi = rows or (0, weight.shape[0])
                B[lo:hi, at:at + a.shape[0]] = b if s == scale else (b.double() * (s / scale)).to(b.dtype)
                if mag is not None:
                    m[lo:hi] = mag
                at += a.shape[0]
            pad = rank - A.shape[0]  # zero rows / columns add nothing: one rank for every module
            A = torch.cat([A, A.new_zeros(pad, A.shape[1])])
            B = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)
            if embedding:
                tensors[f"{name}.lora_embedding_A"], tensors[f"{name}.lora_embedding_B"] = A, B
            else:
                tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = A, B
            if m is not None:
                tensors[f"{name}.lora_magnitude_vector"] = m
            module_scale[name] = scale
        targets, _ = peft.target_modules(set(per_module))
        common = max(set(module_scale.values()), key=lambda s: (list(module_scale.values()).count(s), -s))

        def alpha_of(scale):  # peft scales by lora_alpha / r
            alpha = float(scale) * rank
            return int(alpha) if alpha.is_integer() else alpha

        alpha_pattern = {re.escape(n): alpha_of(s) for n, s in sorted(module_scale.items()) if s != common}
        return tensors, {
            "r": rank, "lora_alpha": alpha_of(common), "lora_dropout": float(self.dropout),
            "target_modules": targets, "fan_in_fan_out": peft.fan_in_fan_out(per_module), "bias": "none",
            "use_rslora": False, "use_dora": bool(self.use_dora), "init_lora_weights": True, "rank_pattern": {},
            "alpha_pattern": alpha_pattern,
        }

    @classmethod
    def from_peft(cls, peft, config, tensors):
        """A PEFT LoRA: rank and alpha as they are (``use_rslora``, per-module ``rank_pattern`` /
        ``alpha_pattern`` kept as deltatune's, keyed by module name), DoRA's magnitudes, LoRA on embeddings,
        and ``init_lora_weights`` 'pissa' / 'olora' saved without conversion: peft computes the residual from
        the base it loads onto, and so does deltatune (the initial pair from this model's weight).
        Refused: variants that compute something else (LoRA biases, aLoRA, ...) and inits that change the
        base in a way the original base cannot reproduce (pissa_niter_*, corda, loftq, lora_ga)."""
        for flag in _PEFT_VARIANTS:
            if config.get(flag):
                raise ConfigError(f"{flag}={config[flag]!r}: deltatune's LoRA has no counterpart for it")
        init = str(config.get("init_lora_weights", True)).lower()
        if init not in _PEFT_PLAIN_INITS | {"pissa", "olora"}:
            raise ConfigError(f"init_lora_weights={config.get('init_lora_weights')!r} changed the base weights in a way "
                              "that the original base cannot reproduce; save the adapter with peft's "
                              "path_initial_model_for_weight_conversion (a plain LoRA relative to the original base)")
        init = init if init in ("pissa", "olora") else "default"
        dora = bool(config.get("use_dora", False))
        parts: dict[str, dict] = defaultdict(dict)
        names = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "A", "lora_embedding_B": "B",
                 "lora_magnitude_vector": "m"}
        for k, t in tensors.items():
            m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_[AB]|lora_magnitude_vector)", k)
            base = re.fullmatch(r"(.+)\.base_layer\.weight", k)
            if m is None and base is not None:  # peft saves a targeted embedding's own weight (save_embedding_layers)
                _check_saved_base(peft, base.group(1), t)
                continue
            if m is None:
                what = "a bias (bias='all' or 'lora_only')" if k.endswith(".bias") else "not a LoRA A/B weight"
                raise ConfigError(f"tensor '{k}' is {what}; deltatune's LoRA holds only lora_A and lora_B weights"
                                  " (and DoRA's magnitudes)")
            parts[m.group(1)][names[m.group(2)]] = (t, "embedding" in m.group(2))
        if not parts:
            raise ConfigError("the adapter holds no LoRA weights")
        r_cfg = peft.get(config, "r", int, 8)
        alpha_cfg = peft.get(config, "lora_alpha", (int, float), 8)
        rslora = bool(config.get("use_rslora", False))
        rank_pattern = peft.get(config, "rank_pattern", dict, {}) or {}
        alpha_pattern = peft.get(config, "alpha_pattern", dict, {}) or {}
        deltas, ranks, alphas, groups = {}, {}, {}, {"linear": set(), "embedding": set()}
        for name, got in parts.items():
            if not {"A", "B"} <= set(got):
                raise ConfigError(f"module '{name}' has lora_{'A' if 'A' in got else 'B'} but not its partner")
            if dora != ("m" in got):
                raise ConfigError(f"module '{name}': use_dora={dora} but the magnitude vector is "
                                  f"{'missing' if dora else 'there'}; the adapter is damaged")
            full = peft.full(name)
            try:
                module = peft.model.get_submodule(full)
            except AttributeError:
                raise ConfigError(f"the adapter targets '{name}', which this model does not have; load it onto "
                                  "the model it was trained on") from None
            embedding = isinstance(module, nn.Embedding)
            if got["A"][1] != embedding:
                raise ConfigError(f"'{name}' is {'an embedding' if embedding else 'not an embedding'} but the adapter "
                                  f"holds lora_{'A' if got['A'][1] else 'embedding_A'} for it")
            feats = (module.num_embeddings, module.embedding_dim) if embedding else peft.features(full)
            if feats is None:
                raise ConfigError(f"the adapter targets '{name}' ({type(module).__name__}); deltatune's LoRA adapts "
                                  "linear projections and token embeddings only")
            if init == "olora" and not embedding and peft.fan_in_fan_out([name]):
                raise ConfigError(f"init_lora_weights='olora' on '{name}', a GPT-2 Conv1D: peft takes the QR of its "
                                  "stored (in, out) weight, so its factors and residual are not those of the (out, in) "
                                  "weight (docs/interop.md); deltatune cannot compute the same function")
            A, B = got["A"][0], got["B"][0]
            r = A.shape[0] if A.dim() == 2 else -1
            if r < 0 or B.dim() != 2 or A.shape[1] != feats[0] or B.shape != (feats[1], r):
                raise ConfigError(f"'{name}': lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not fit a "
                                  f"{feats[0]} -> {feats[1]} {'embedding' if embedding else 'projection'}")
            if r == 0:
                raise ConfigError(f"'{name}': lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} have rank 0; a LoRA "
                                  "has rank 1 or more, so the adapter is damaged")
            if r != peft.pattern_value("rank_pattern", rank_pattern, name, r_cfg):
                raise ConfigError(f"'{name}': rank {r} disagrees with the config's r / rank_pattern")
            alpha = peft.pattern_value("alpha_pattern", alpha_pattern, name, alpha_cfg)
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
                raise ConfigError(f"'{name}': lora_alpha / alpha_pattern gives {alpha!r}; it must be a finite number")
            if dora and tuple(got["m"][0].shape) != (feats[1],):
                raise ConfigError(f"'{name}': lora_magnitude_vector {tuple(got['m'][0].shape)} does not fit the "
                                  f"module's {feats[1]} outputs")
            key = peft.key(full)
            deltas[key + ".A"], deltas[key + ".B"] = A, B
            if dora:
                deltas[key + ".m"] = got["m"][0]
            if init in ("pissa", "olora"):
                if embedding:
                    raise ConfigError(f"init_lora_weights='{init}' on the embedding '{name}': peft starts embeddings "
                                      "from zero, not from the weight; the config is inconsistent")
                scale = alpha / (math.sqrt(r) if rslora else r)
                if init == "pissa" and scale == 0:
                    raise ConfigError(f"'{name}': init_lora_weights='pissa' with lora_alpha 0 divides by zero")
                A0, B0 = principal_factors(weight_out_in(module), r, scale, init)
                deltas[key + ".A0"], deltas[key + ".B0"] = A0.to(A.dtype), B0.to(B.dtype)
            ranks[name], alphas[name] = r, float(alpha)
            groups["embedding" if embedding else "linear"].add(full)
        if groups["embedding"] and config.get("ensure_weight_tying"):
            raise ConfigError("ensure_weight_tying=true: peft also adapts the LM head tied to the embedding; deltatune's "
                              "embedding LoRA adapts the lookup only")
        chosen, layers = peft.choose_sites([groups["linear"], groups["embedding"]])
        if groups["embedding"]:
            try:
                if {t.name for t in S.resolve(peft.model, "embed")} == groups["embedding"]:
                    chosen[1] = ["embed"]
            except ConfigError:  # no named embedding site: the pattern stays
                pass
        options = {"r": r_cfg, "alpha": float(alpha_cfg),
                   "dropout": float(peft.get(config, "lora_dropout", (int, float), 0.0) or 0.0),
                   "sites": chosen[0] + chosen[1], "layers": layers}
        extra = {"use_rslora": rslora, "use_dora": dora, "init": init,
                 "rank_pattern": {re.escape(n): r for n, r in sorted(ranks.items()) if r != r_cfg},
                 "alpha_pattern": {re.escape(n): a for n, a in sorted(alphas.items()) if a != float(alpha_cfg)}}
        defaults = cls().options()
        options.update({k: v for k, v in extra.items() if v != defaults[k]})  # only what differs from LoRA's defaults
        return options, deltas
