"""``transformers.Trainer`` and deltatune: a model with deltatune adapters trains under the Trainer as it
is (only the adapters and the head require grad, so the optimizer sees only them), and
:class:`DeltatuneCallback` writes the adapters into every checkpoint the Trainer saves.

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[DeltatuneCallback()])

Each checkpoint ``<output_dir>/checkpoint-<step>/`` then holds ``deltatune/<adapter>/`` (deltatune's
format; ``formats=("deltatune", "peft")`` adds ``deltatune/<adapter>-peft/`` in the PEFT format),
which ``dt.load_adapter(fresh_model, dir)`` loads. At the end of training the adapters are also
written to ``<output_dir>/deltatune/<adapter>/``.
"""
from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .. import formats
from ..errors import ConfigError


class DeltatuneCallback(TrainerCallback):
    """Saves deltatune adapters at Trainer checkpoints (and at the end of training).

    ``adapters``: names to save (default: the model's active adapters). ``formats``: "deltatune"
    and/or "peft". ``subdir``: the folder inside each checkpoint. Only the main process writes.
    """

    def __init__(self, adapters=None, formats=("deltatune",), subdir: str = "deltatune", at_end: bool = True):
        formats = (formats,) if isinstance(formats, str) else tuple(formats)
        bad = [f for f in formats if f not in ("deltatune", "peft")]
        if bad or not formats:
            raise ConfigError(f"formats must be 'deltatune' and/or 'peft', got {formats!r}")
        self.adapters = None if adapters is None else list(adapters)
        self.formats, self.subdir, self.at_end = formats, subdir, at_end
        self.saved: list[Path] = []  # every adapter directory written, in order

    def _write(self, model, where: Path) -> None:
        import deltatune as dt

        model = getattr(model, "module", model)  # DDP / accelerate wrappers
        names = self.adapters if self.adapters is not None else dt.active_adapters(model)
        for name in names:
            for fmt in self.formats:
                out = where / self.subdir / (name if fmt == "deltatune" else f"{name}-peft")
                formats.save_adapter(model, out, adapter=name, format=fmt)
                self.saved.append(out)

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            self._write(model, Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.at_end and state.is_world_process_zero and model is not None:
            self._write(model, Path(args.output_dir))
        return control
