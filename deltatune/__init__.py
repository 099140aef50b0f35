"""deltatune: parameter-efficient fine-tuning on one small core.

Every method is a delta at a site, combined in a certain way (He et al. 2022):

    import deltatune as dt
    model = dt.attach(model, "lora", r=8, sites=["attn.q", "attn.v"])
    trainable, total = dt.count_parameters(model)
    dt.save_adapter(model, "out/dir"); dt.load_adapter(fresh_model, "out/dir")
    dt.merge(model); dt.unmerge(model); dt.detach(model)
    with dt.routing(model, ["search", None, "bugs"]): model(**batch)   # one adapter (or none) per row
"""
from . import methods as _methods  # noqa: F401  (registers every method)
from .registry import REGISTRY, Composite, Method, Placement, method_info, option, register
from .store import (
    active_adapters,
    adapters,
    attach,
    count_parameters,
    detach,
    fold,
    merge,
    merged_bytes,
    routing,
    set_active,
    set_frozen_dropout,
    unmerge,
    use,
)
from .errors import AdapterFileError, ConfigError, DataError, DeltatuneError, SiteError, StorageError, TrainingError
from . import formats
from .formats import load_adapter, read_adapter, save_adapter
from . import compose  # registers the "stack" method; dt.compose.stack/average/fold_into_base
from .sites import SITES, family_of, known_sites

__version__ = "0.1.0"


def methods() -> list[str]:
    """Names of the registered methods."""
    return sorted(REGISTRY)


__all__ = [
    "formats", "compose", "methods", "method_info", "attach", "detach", "merge", "unmerge", "fold", "count_parameters",
    "save_adapter", "load_adapter", "read_adapter", "set_active", "active_adapters", "adapters",
    "register", "option", "Method", "Composite", "Placement", "routing", "use", "merged_bytes", "set_frozen_dropout", "SITES", "family_of", "known_sites",
    "DeltatuneError", "ConfigError", "SiteError", "AdapterFileError", "DataError", "TrainingError",
    "StorageError",
]
