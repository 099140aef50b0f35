import re
from collections import defaultdict


from ..combine import PARALLEL
from ..deltas import RandomProjections, ScaledRandom
from ..errors import ConfigError
from ..registry import Method, Placement, option, register
from ..sites import target_features

SHARED = "vera"  # the adapter's one RandomProjections: shared~vera


@register
class VeRA(Method):
    """h = W0 x + Λ_b B Λ_d A x: frozen random A (r, in) and B (out, r), one pair shared by every adapted
    layer, and trained vectors d (r,) and b (out,) per layer.

    Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation" (ICLR), §3.1: A and B are drawn
    once (kaiming-uniform) sized for the largest adapted layer, each layer slicing A[:, :in] and B[:out];
    b starts at 0 and d at ``d_initial`` (§3.2; 0.1 as in peft), so training starts at the base model.
    The random pair is drawn from ``seed`` (peft's projection_prng_key) exactly as peft draws it, and is
    saved with the adapter unless ``save_projection=False`` (then drawn again at load). r = 256 (peft's
    default). Mergeable: W0 += diag(b) B diag(d) A.
    """

    name = "vera"
    paper = "Kopiczko et al. 2024, VeRA"
    lr = 1e-2  # VeRA trains two vectors per layer and takes larger rates than LoRA (the paper's GLUE runs: 4e-3 to 1e-2)
    combines = (PARALLEL,)

    r: int = option(256, min=1)
    d_initial: float = option(0.1, min=-1e6, help="the value every entry of d starts at")
    dropout: float = option(0.0, min=0.0, max=0.99)
    seed: int = option(0, min=0, max=2**63 - 1, help="the seed of the shared random A and B (peft's projection_prng_key)")
    save_projection: bool = option(True, help="save A and B with the adapter (else they are drawn from seed at load)")
    sites: list = option(["attn.q", "attn.v"])

    def placements(self, model):
        targets = self.targets(model, self.sites)
        features = [target_features(t, self.name) for t in targets]
        projections = RandomProjections(self.r, max(i for i, _ in features), max(o for _, o in features), self.seed,
                                        persistent=self.save_projection)
        return [Placement(t, ScaledRandom(d_in, d_out, projections, SHARED, self.d_initial, self.dropout), PARALLEL)
                for t, (d_in, d_out) in zip(targets, features)]

    # -- the Hugging Face PEFT format (peft 0.21 VERA)
    peft_type = "VERA"
    peft_shared = ("vera_A", "vera_B")

    def to_peft(self, peft, deltas):
        """``<module>.vera_lambda_b`` (out,) and ``vera_lambda_d`` (r,); ``vera_A``, ``vera_B`` on the tuner
        when the projections are saved. peft adapts whole modules and draws one pair sized by them: the
        slices of GPT-2's c_attn (attn.q, attn.k, attn.v) each have their own d, which one VeRA on c_attn
        cannot hold, so those are refused (the sites ``re:h\\.(?P<layer>\\d+)\\.attn\\.c_attn`` adapt it whole)."""
        tensors, chosen, shared = {}, set(), {}
        for module_name, marks, params in deltas:
            if module_name == "shared" and marks == (SHARED,):  # the adapter's shared~vera (the bridge splits at '~')
                shared = params
                continue
            if marks:
                raise ConfigError(f"vera on {'attn.' + marks[0]}, a slice of GPT-2's fused {module_name}: peft's VeRA "
                                  "adapts c_attn whole with one d for q, k and v together; train with sites "
                                  "['re:h\\.(?P<layer>\\d+)\\.attn\\.c_attn'] to export it")
            name = peft.rel(module_name)
            tensors[f"{name}.vera_lambda_b"], tensors[f"{name}.vera_lambda_d"] = params["b"], params["d"]
            chosen.add(name)
        if self.save_projection:
            tensors["vera_A"], tensors["vera_B"] = shared["A"], shared["B"]
        targets, _ = peft.target_modules(chosen)
        return tensors, {"r": self.r, "target_modules": targets, "projection_prng_key": self.seed,
                         "save_projection": self.save_projection, "vera_dropout": float(self.dropout),
                         "d_initial": float(self.d_initial), "fan_in_fan_out": peft.fan_in_fan_out(chosen),
                         "bias": "none", "init_weights": True}

    @classmethod
    def from_peft(cls, peft, config, tensors):
        """A PEFT VeRA: the vectors per module, the projections from the file or drawn from the key (peft's
        recipe). Refused: VeRA biases (bias='all' / 'vera_only'), which deltatune's VeRA does not train."""
        if config.get("bias", "none") not in ("none", None):
            raise ConfigError(f"bias={config.get('bias')!r}: deltatune's VeRA trains no biases")
        r = peft.get(config, "r", int, 256)
        seed = peft.get(config, "projection_prng_key", int, 0)
        saved = bool(config.get("save_projection", True))
        vectors: dict[str, dict] = defaultdict(dict)
        shared = {}
        for k, t in tensors.items():
            if k in ("vera_A", "vera_B"):
                shared[k[-1]] = t
                continue
            m = re.fullmatch(r"(.+)\.vera_lambda_([bd])", k)
            if m is None:
                raise ConfigError(f"tensor '{k}' is not a VeRA vector (vera_lambda_b, vera_lambda_d) or projection")
            vectors[m.group(1)][m.group(2)] = t
        if not vectors:
            raise ConfigError("the adapter holds no VeRA vectors")
        if saved != bool(shared):
            raise ConfigError(f"save_projection={saved} but the file {'lacks' if saved else 'holds'} vera_A / vera_B; "
                              "the adapter is damaged")
        deltas, features, modules = {}, [], set()
        for name, got in vectors.items():
            if set(got) != {"b", "d"}:
                raise ConfigError(f"module '{name}' has vera_lambda_{'b' if 'b' in got else 'd'} but not its partner")
            full, feats = peft.projection(name)
            if tuple(got["b"].shape) != (feats[1],) or tuple(got["d"].shape) != (r,):
                raise ConfigError(f"'{name}': vera_lambda_b {tuple(got['b'].shape)} and vera_lambda_d "
                                  f"{tuple(got['d'].shape)} do not fit a {feats[0]} -> {feats[1]} projection at r={r}")
            deltas[peft.key(full) + ".b"], deltas[peft.key(full) + ".d"] = got["b"], got["d"]
            features.append(feats)
            modules.add(full)
        want = ((r, max(i for i, _ in features)), (max(o for _, o in features), r))
        if shared:
            if (tuple(shared["A"].shape), tuple(shared["B"].shape)) != want:
                raise ConfigError(f"vera_A {tuple(shared['A'].shape)} and vera_B {tuple(shared['B'].shape)} do not fit "
                                  f"the adapted modules, which need {want[0]} and {want[1]}")
            deltas[f"shared~{SHARED}.A"], deltas[f"shared~{SHARED}.B"] = shared["A"], shared["B"]
        (site_list,), layers = peft.choose_sites([modules])
        return {"r": r, "d_initial": float(peft.get(config, "d_initial", (int, float), 0.1)),
                "dropout": float(peft.get(config, "vera_dropout", (int, float), 0.0) or 0.0), "seed": seed,
                "save_projection": saved, "sites": site_list, "layers": layers}, deltas
