"""The model card of a diffusers export: `README.md` with the YAML front matter the Hub reads.

It says what the adapters do, how to load them in plain diffusers (a code block the tests run as
written), what diffusers does not carry, how the model was trained (the model folder's
`train_record.json`) and, when an evaluation table is named, its scores with their 95% intervals.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

#: metric (a column of the evaluation's table.csv) -> (what the card calls it, which way is better)
CARD_METRICS = {
    "identity_similarity": ("identity similarity", "higher"),
    "expression_error": ("expression error", "lower"),
    "expression_error_gt": ("expression error vs ground truth", "lower"),
    "identity_leakage": ("identity leakage", "lower"),
    "fid": ("FID", "lower"),
}


def results_rows(table: Path, method: str) -> list[dict[str, str]]:
    """The rows of `method` over all styles in an evaluation's table.csv (columns style, method,
    metric, mean, ci_low, ci_high, n), in CARD_METRICS order; raises naming the file when none."""
    with open(table, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["method"] == method and r["style"] == "all"]
    by_metric = {r["metric"]: r for r in rows}
    picked = [by_metric[m] for m in CARD_METRICS if m in by_metric]
    if not picked:
        methods = sorted({r["method"] for r in csv.DictReader(open(table, newline=""))})
        raise ValueError(f"{table}: no rows of method {method!r}; methods: {', '.join(methods)}")
    return picked


def _results_section(table: Path | None, method: str | None) -> list[str]:
    if table is None or method is None:
        return [
            "No evaluation was attached to this export (`emojidiff export --results TABLE.csv --method NAME`)."
        ]
    lines = [
        f"Method `{method}` of `{table}` (the evaluation's held-out protocol, evaluation analysers that the "
        "training losses never saw; 95% bootstrap intervals over rows):",
        "",
        "| metric | value | 95% CI | rows | better |",
        "| --- | ---: | --- | ---: | --- |",
    ]
    for row in results_rows(table, method):
        name, better = CARD_METRICS[row["metric"]]
        ci = f"[{float(row['ci_low']):.3f}, {float(row['ci_high']):.3f}]" if row["ci_low"] else "(set metric)"
        lines.append(f"| {name} | {float(row['mean']):.3f} | {ci} | {row['n'] or '-'} | {better} |")
    return lines


def _training_section(model_dir: Path) -> list[str]:
    record_file = model_dir / "train_record.json"
    if not record_file.is_file():
        return ["The model folder holds no `train_record.json`: its training is not recorded here."]
    record = json.loads(record_file.read_text())
    hp = record.get("hparams", {})
    keep = {k: hp[k] for k in sorted(hp) if not k.startswith("_") and hp[k] is not None}
    return [
        f"Stage `{record.get('stage')}`, {record.get('global_step')} steps, {record.get('weights', 'live')} "
        f"weights, seed {hp.get('seed')}; the module's arguments as recorded in `train_record.json`:",
        "",
        "```yaml",
        yaml.safe_dump(keep, sort_keys=True).rstrip(),
        "```",
    ]


def loading_code(export_dir: Path, base: str, has_lora: bool, prompt: str, examples: Sequence[str]) -> str:
    """The card's code block: plain diffusers plus the embeds helper, on the export's example images."""
    base_line = (
        f'BASE = resolve_backbone("{base}")  # a packaged base: its folder inside the emojidiff package'
        if base.startswith("emojidiff:")
        else f'BASE = "{base}"'
    )
    lora = (
        '\npipe.load_lora_weights(EXPORT, weight_name="pytorch_lora_weights.safetensors")' if has_lora else ""
    )
    return f'''import json

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from emojidiff.models.diffusers_export import image_embeds
from emojidiff.packaged import resolve_backbone

EXPORT = "{export_dir}"
{base_line}
pipe = StableDiffusionPipeline.from_pretrained(
    BASE,
    torch_dtype=torch.float32,
    local_files_only=True,
    use_safetensors=True,
    safety_checker=None,
    requires_safety_checker=False,
)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
pipe.load_ip_adapter(
    EXPORT,
    subfolder="",
    weight_name=["ip-adapter-identity.safetensors", "ip-adapter-expression.safetensors"],
    image_encoder_folder=None,
    local_files_only=True,
){lora}
with open(f"{{EXPORT}}/emojidiff_export.json") as f:
    pipe.set_ip_adapter_scale(json.load(f)["ip_adapter_scales"])
# [identity, expression] embeddings, the unconditional half first (guidance > 1)
embeds = image_embeds(EXPORT, id_image=f"{{EXPORT}}/{examples[0]}", expr_image=f"{{EXPORT}}/{examples[1]}")
image = pipe(
    "{prompt}",
    ip_adapter_image_embeds=embeds,
    guidance_scale=5.0,
    num_inference_steps=30,
    generator=torch.Generator().manual_seed(0),
).images[0]
image.save("emojidiff_diffusers.png")
'''


def model_card(
    export_dir: Path,
    name: str,
    base: str,
    record: Mapping[str, Any],
    files: Mapping[str, Mapping[str, int]],
    prompt: str,
    examples: Sequence[str],
    results: Path | None = None,
    method: str | None = None,
) -> str:
    """README.md text of the export in `export_dir` (record: `export_record`; files: {name:
    {"parameters": n, "bytes": n}}; examples: the identity and expression images in the folder)."""
    front = {
        "library_name": "diffusers",
        "base_model": base,
        "pipeline_tag": "text-to-image",
        "tags": ["ip-adapter", "emojidiff", "facial-expression", "identity-preservation", "stable-diffusion"],
    }
    has_lora = "pytorch_lora_weights.safetensors" in files
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {name}: EmojiDiff's E-Adapter as two diffusers IP-Adapters",
        "",
        "A portrait of one person (the identity reference) wearing another picture's facial expression "
        "(the expression template): a re-implementation of *EmojiDiff: Advanced Facial Expression Control "
        "with High Identity Preservation in Portrait Generation* (arXiv 2412.01254). The identity adapter "
        "reads a face-recognition embedding of the reference; the expression adapter reads the template's "
        "expression features and sits only in the layers listed below, so the template's identity has "
        "little room to leak in.",
        "",
        "## Files",
        "",
        "| file | parameters | bytes |",
        "| --- | ---: | ---: |",
        *(f"| `{f}` | {v['parameters']:,} | {v['bytes']:,} |" for f, v in files.items()),
        "",
        "`emojidiff_export.json` holds the per-block scales, the image-projection layouts and what is not "
        "carried; `emojidiff/` is the EmojiDiff model folder the embeds helper reads its encoders from.",
        "",
        f"Expression layers: {', '.join(f'`{n}`' for n in record['expression_layers'])}.",
        "",
        "## Load it in plain diffusers",
        "",
        "```python",
        loading_code(export_dir, base, has_lora, prompt, examples).rstrip(),
        "```",
        "",
        "## What plain diffusers does not carry",
        "",
        *(f"- {note}" for note in record["not_carried"]),
        "",
        "## Training",
        "",
        *_training_section(export_dir / "emojidiff"),
        "",
        "## Results",
        "",
        *_results_section(results, method),
        "",
    ]
    return "\n".join(lines)
