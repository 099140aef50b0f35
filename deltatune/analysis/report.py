"""The analysis written out: analysis.json, probing.png, similarity.png and a small analysis.html.

The HTML is one self-contained page (plots inlined) that ``deltatune report`` pages can link to. The
folder is an analysis folder of :class:`deltatune.storage.OwnedFolder`'s rule: new, empty or one written
by an earlier analysis (its marker); nothing in it is written through a link.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from .. import storage
from ..errors import DataError


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_probing(probing: dict, path) -> Path:
    """Score per hidden state per property, each with its baseline dashed in the same colour."""
    return _save(*_probing_figure(probing), path)


def _probing_figure(probing: dict):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (prop, r) in enumerate(probing.items()):
        color = f"C{i}"
        ax.plot(range(len(r["score"])), r["score"], marker="o", color=color, label=f"{prop} ({r['metric']})")
        ax.axhline(r["baseline"], color=color, linestyle="--", linewidth=0.8)
    ax.set_xticks(range(max(len(r["score"]) for r in probing.values())))
    ax.set_xlabel("hidden state (0 = embeddings, i = output of block i-1)")
    ax.set_ylabel("test accuracy / MRR")
    ax.set_title("Linear probes per layer (dashed: majority / random baseline)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return plt, fig


def _png(plt, fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _save(plt, fig, path) -> Path:
    """The figure as PNG, written atomically to ``path`` (a link there is replaced itself, never written through)."""
    path = Path(path)
    storage.atomic_write_bytes(path, _png(plt, fig))
    return path


def plot_similarity(similarity: dict, path, threshold: float | None = None) -> Path:
    """RSA (Spearman, solid; Pearson, dotted) and linear CKA (dashed) per hidden state per fine-tune."""
    return _save(*_similarity_figure(similarity, threshold), path)


def _similarity_figure(similarity: dict, threshold: float | None = None):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for i, (name, r) in enumerate(similarity["models"].items()):
        color = f"C{i}"
        x = range(len(r["cka"]))
        axes[0].plot(x, r["rsa_spearman"], marker="o", color=color, label=name)
        axes[0].plot(x, r["rsa_pearson"], linestyle=":", color=color)
        if "rsa_spearman_std" in r:
            axes[0].plot(x, r["rsa_spearman_std"], linestyle="-.", color=color)
        axes[1].plot(x, r["cka"], marker="s", linestyle="--", color=color, label=name)
    if threshold is not None:
        axes[0].axhline(threshold, color="grey", linewidth=0.8)
    axes[0].set_title("RSA with the pretrained model (solid: Spearman, dotted: Pearson, dash-dot: Spearman on "
                      "standardised dimensions)", fontsize=8)
    axes[1].set_title("linear CKA with the pretrained model", fontsize=9)
    for ax in axes:
        ax.set_xticks(range(max(len(r["cka"]) for r in similarity["models"].values())))
        ax.set_xlabel("hidden state (0 = embeddings)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("similarity")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return plt, fig


def _img(path: Path) -> str:
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{base64.b64encode(storage.read_bytes(path)).decode()}">'


def _num(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))


def html_section(result: dict, images: dict) -> str:
    """The analysis as an HTML fragment (a <section>), for a page of its own or a bench report."""
    parts = [f"<section id='layer-analysis'><h2>Layer analysis: {html.escape(result['model'])} on "
             f"{html.escape(result['task'])}</h2>"]
    freeze = result.get("freeze")
    if freeze:
        parts.append(f"<p><b>Recommended freeze depth K = {freeze['k']}</b> (telly k={freeze['k']}). "
                     f"Rule: {html.escape(freeze['rule'])}</p>")
    probing = result.get("probing")
    if probing:
        n = max(len(r["score"]) for r in probing.values())
        head = "".join(f"<th>h{i}</th>" for i in range(n))
        rows = []
        for prop, r in probing.items():
            best = r["peak_layer"]
            cells = "".join(f"<td>{'<b>' if i == best else ''}{_num(v)}{'</b>' if i == best else ''}</td>"
                            for i, v in enumerate(r["score"]))
            weighted = _num(r["weighted"]["accuracy"]) if "weighted" in r else "&ndash;"
            rows.append(f"<tr><td>{html.escape(prop)}</td><td>{r['metric']}</td>{cells}<td>{weighted}</td>"
                        f"<td>{_num(r['baseline'])}</td><td>{r.get('n_test', '')}</td></tr>")
        parts.append("<h3>Probing (test split; peak in bold)</h3><table><tr><th>property</th><th>metric</th>"
                     f"{head}<th>weighted</th><th>baseline</th><th>test n</th></tr>{''.join(rows)}</table>")
        if "probing" in images:
            parts.append(_img(images["probing"]))
    sim = result.get("similarity")
    if sim:
        rows = []
        for name, r in sim["models"].items():
            for key in ("rsa_spearman", "rsa_spearman_std", "rsa_pearson", "cka"):
                if key not in r:
                    continue
                rows.append(f"<tr><td>{html.escape(name)}</td><td>{key}</td>"
                            + "".join(f"<td>{_num(v)}</td>" for v in r[key]) + "</tr>")
        n = max(len(r["cka"]) for r in sim["models"].values())
        parts.append(f"<h3>Similarity with the pretrained model ({sim['samples']} {sim['split']} samples)</h3>"
                     "<table><tr><th>model</th><th>score</th>" + "".join(f"<th>h{i}</th>" for i in range(n))
                     + f"</tr>{''.join(rows)}</table>")
        if "similarity" in images:
            parts.append(_img(images["similarity"]))
    parts.append("</section>")
    return "\n".join(parts)


def folder(out_dir) -> storage.OwnedFolder:
    """The analysis folder ``out_dir``, to be checked before the analysis runs (``folder(out).check()``)."""
    return out_dir if isinstance(out_dir, storage.OwnedFolder) else storage.OwnedFolder(out_dir, storage.ANALYSIS)


FILES = ("analysis.json", "analysis.html", "probing.png", "similarity.png")


def write(result: dict, out_dir) -> dict[str, Path]:
    """analysis.json, the plots and analysis.html in ``out_dir`` (a folder, or an OwnedFolder); returns their paths."""
    owned = folder(out_dir)
    owned.open()
    for name in FILES:  # every name checked (no link, FIFO or folder there) before the first is written
        owned.file(name)
    files = {}
    if result.get("probing"):
        files["probing"] = owned.write_bytes("probing.png", _png(*_probing_figure(result["probing"])))
    if result.get("similarity"):
        files["similarity"] = owned.write_bytes("similarity.png", _png(*_similarity_figure(
            result["similarity"], result.get("settings", {}).get("threshold"))))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>deltatune layer analysis</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:right}img{max-width:100%}"
            "</style></head><body>" + html_section(result, files) + "</body></html>")
    files["html"] = owned.write_bytes("analysis.html", page.encode("utf-8"))
    files["json"] = owned.path / "analysis.json"
    owned.write_json("analysis.json", {**result, "files": {k: str(v) for k, v in files.items()}})
    return files


def read(out_dir) -> dict:
    """The analysis.json of an analysis folder (never through a link, a FIFO or a device)."""
    path = Path(out_dir) / "analysis.json"
    try:
        return json.loads(storage.read_bytes(path, 1 << 28).decode("utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise DataError(f"{path} cannot be read as the analysis.json deltatune writes ({type(err).__name__}: {err}); "
                        "run the analysis again") from None
