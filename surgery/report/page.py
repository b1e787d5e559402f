"""The self-contained HTML page (pictures embedded as data URIs) and its number tables."""
from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any, Optional

from .plots import percent


METRIC_ROWS = [  # (key, label, format)
    ("outlier_share", "outlier share of patch tokens", "{:.2%}"),
    ("max_over_median_patch_norm", "max / median patch-token norm", "{:.2f}"),
    ("max_patch_norm", "max patch-token norm", "{:.3g}"),
    ("median_patch_norm", "median patch-token norm", "{:.3g}"),
    ("cls_attention_top_patch_mass", "CLS attention mass on the top 1 % of patches", "{:.2%}"),
    ("cls_attention_entropy", "CLS attention entropy, all tokens (nats)", "{:.3f}"),
    ("cls_patch_attention_entropy", "CLS attention entropy over patches, renormalised (nats)", "{:.3f}"),
    ("cls_attention_register_mass", "CLS attention mass on the test-time register(s)", "{:.2%}"),
    ("register_norm", "test-time register token norm", "{:.3g}"),
]


# ---- writing ----------------------------------------------------------------------------------

def display_spec(spec: str, out_dir: Path) -> str:
    """Paths inside an output that is still being written (atomic temporary folder) are shown relative
    to the report, so the report does not name a folder that no longer exists once it is moved."""
    p = Path(spec)
    parent = out_dir.resolve().parent
    if p.exists() and parent.name.startswith(".") and ".partial-" in parent.name \
            and p.resolve().is_relative_to(parent):
        return os.path.relpath(p.resolve(), out_dir.resolve())
    return spec


def _fmt(v: Any, f: str) -> str:
    if v is None:
        return "–"
    try:
        return f.format(v)
    except (TypeError, ValueError):
        return html.escape(str(v))


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222}h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.3em .7em;text-align:right}
td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
.note{background:#fff8e1;border-left:4px solid #ffb300;padding:.5em 1em}.small{color:#666;font-size:.9em}
code{background:#f4f4f4;padding:0 .2em}"""


def report_html(summary: dict[str, Any], pictures: dict[str, bytes]) -> str:
    e = html.escape
    s = summary
    parts = _html_head(s) + _html_numbers(s) + _html_pictures(s, pictures)
    knn = s.get("knn")
    if knn:
        text = (f"{knn['delta_points']:+.2f} points; predictions agree on {knn['prediction_agreement']:.2%}; "
                f"{knn['gallery_images']} gallery / {knn['query_images']} query images, "
                f"{len(knn['classes'])} classes; {knn['split']}; dataset {knn['dataset']}")
        parts.append("<h2>k-NN accuracy (is the function kept?)</h2><table>"
                     "<tr><th></th><th>original</th><th>baked</th></tr>"
                     f"<tr><td>top-1 accuracy (k = {knn['k']}, cosine)</td><td>{knn['top1_original']:.2%}</td>"
                     f"<td>{knn['top1_baked']:.2%}</td></tr></table><p>{e(text)}</p>")
    parts.append(f'<p class="small">vit-surgery {e(s["tool_version"])}. Every number is in summary.json; '
                 "the pictures are also saved as PNG files next to this page.</p></body></html>")
    return "\n".join(parts)


def _html_head(s: dict[str, Any]) -> list[str]:
    """The page head, the table of what was compared on which images, and the notes."""
    e = html.escape
    skipped = f", {s['skipped_images']} unreadable skipped" if s["skipped_images"] else ""
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>vit-surgery report</title>"
             f"<style>{CSS}</style></head><body>",
             "<h1>Test-time register: before / after</h1>",
             "<table>",
             f"<tr><td>original</td><td>{e(s['original'])}</td></tr>",
             f"<tr><td>baked</td><td>{e(str(s['baked']))}</td></tr>",
             f"<tr><td>baked side</td><td>{e(s['baked_side'])}</td></tr>",
             f"<tr><td>register neurons</td><td>{e(json.dumps(s['recipe']['register_neurons']) if s['recipe'] else '–')}"
             f"{e(', R = ' + str(s['recipe']['num_registers'])) if s['recipe'] else ''}</td></tr>",
             f"<tr><td>images</td><td>{s['num_images']} from {e(str(s['images']))}{skipped}</td></tr>",
             f"<tr><td>measured at</td><td>block {s['detect_layer']} of {s['depth']}; outlier rule: "
             f"{e(str(s['threshold_rule']))}</td></tr>",
             "</table>"]
    for note in s["notes"]:
        parts.append(f'<p class="note">{e(note)}</p>')
    return parts


def _html_numbers(s: dict[str, Any]) -> list[str]:
    """The metric table, original against baked, and what its terms mean."""
    e = html.escape
    parts = ["<h2>Numbers</h2><table><tr><th>metric (mean over images)</th><th>original</th><th>baked</th></tr>"]
    mo, mb = s["metrics"].get("original", {}), s["metrics"].get("baked", {})
    for key, label, f in METRIC_ROWS:
        parts.append(f"<tr><td>{e(label)}</td><td>{_fmt(mo.get(key), f) if key in mo else '–'}</td>"
                     f"<td>{_fmt(mb.get(key), f) if key in mb else '–'}</td></tr>")
    cos = s.get("pooled_cosine_similarity")
    if cos:
        parts.append(f"<tr><td>cosine similarity of pooled outputs, original vs baked</td>"
                     f"<td colspan=\"2\">mean {cos['mean']:.7g}, min {cos['min']:.7g}</td></tr>")
    parts.append("</table>")
    parts.append('<p class="small">Outlier: a patch token whose norm at the measured block exceeds the rule above. '
                 'Top 1 %: the largest 1 % of the CLS token\'s attention weights over patches (at least one patch), '
                 'last block, averaged over heads. Entropy of the CLS attention row (last block, head average). '
                 'Pooled output: the model\'s image embedding / head output.</p>')
    return parts


def _lm_attention_text(lm: Optional[dict[str, Any]]) -> str:
    if not lm:
        return ""
    parts = [f"{side}: {percent(lm[side]['image_attention_share'])} of the row on the image tokens, "
             f"{percent(lm[side]['top1pct_image_attention_share'])} of that on the top 1 % of image tokens"
             for side in ("original", "baked") if side in lm]
    return "; ".join(parts) + f" ({lm['definition']})."


def _html_pictures(s: dict[str, Any], pictures: dict[str, bytes]) -> list[str]:
    """One section per drawn picture, embedded, with its caption."""
    e = html.escape
    sections = [
        ("layer_norms.png", "Token norms per block",
         (f"Outliers appear at block {s['outliers_appear_at_block']}: the patches that are outliers at block "
          f"{s['detect_layer']} already break the outlier rule there, and reach 90 % of their peak norm ratio "
          f"at block {s['outliers_peak_from_block']}.") if s["outliers_appear_at_block"] is not None
         else "No outliers in the original on these images."),
        ("norm_maps.png", "Token-norm maps over the patch grid", ""),
        ("attention_maps.png", "Last-block CLS attention over patches", ""),
        ("lm_attention_maps.png", "Language model: last text token's attention to the image tokens",
         _lm_attention_text(s.get("lm_attention"))),
        ("neuron_ranking.png", "Register-neuron ranking and the chosen cut",
         f"Source: {s['ranking']['source']}." if s.get("ranking") else ""),
    ]
    parts = []
    for name, title, text in sections:
        if name not in pictures:
            continue
        parts.append(f"<h2>{e(title)}</h2>")
        if text:
            parts.append(f"<p>{e(text)}</p>")
        parts.append(_img(pictures[name], title))
    return parts


