"""`emojidiff package`: a trained model folder -> its fp16 copy inside the package (`emojidiff:NAME`).

    emojidiff package --model outputs/train/ica/model              # -> emojidiff:emojidiff-world
    emojidiff package --model DIR --dest /tmp/copy                  # anywhere else (a check, a release)

`make package` runs the first form after `make train`; the copy is what `make demo` and
`--model emojidiff:emojidiff-world` load on a fresh clone. Written: `emojidiff_model.json`, the
adapter (`adapter/`, weights cast to float16: half the size, and the pipeline computes in the
backbone's dtype either way), the trained expression encoder's weights if the model has one (fp16),
the source's `train_record.json`, and `package_record.json` (source folder, dtypes, sizes and
sha256 of every weight file). The model must run on a packaged backbone (`emojidiff:...`), so the
copy does not depend on a path outside the package.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from emojidiff.packaged import DEFAULT_MODEL, PACKAGED_MODELS, PREFIX

# torch, diffusers, PIL and the models are imported inside the functions that use them: `emojidiff --help`
# imports this module to list its options (start-up time).
HELP = "copy a trained model folder into the package as fp16 safetensors (emojidiff:NAME)"
log = logging.getLogger(__name__)


@dataclass
class PackageOptions:
    """package"""

    model: Path
    """a model folder written by training (emojidiff_model.json)"""
    name: str = DEFAULT_MODEL.removeprefix(PREFIX)
    """the packaged name to install as (a slot of emojidiff.packaged.PACKAGED_MODELS)"""
    dest: Path | None = None
    """write here instead of into the package"""


#: run's keyword arguments -> the option dataclass each is parsed into (`emojidiff.cli`)
OPTIONS = {"opts": PackageOptions}


def _half(src: Path, dst: Path) -> dict[str, str]:
    """Copy a safetensors file with floating tensors cast to float16; returns their source dtypes."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors, dtypes = {}, {}
    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
        for key in f.keys():
            t = f.get_tensor(key)
            dtypes[str(t.dtype)] = dtypes.get(str(t.dtype), 0) + 1
            tensors[key] = t.half() if t.is_floating_point() else t
    if any(not torch.isfinite(v.float()).all() for v in tensors.values() if v.is_floating_point()):
        raise ValueError(f"{src}: a weight overflows float16; keep this model in float32")
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst), metadata=metadata)
    return {k: str(v) for k, v in dtypes.items()}


def package_model(model: str | Path, dest: str | Path) -> Path:
    """Write the fp16 copy of model folder `model` into `dest` (replaced if it exists); returns `dest`."""
    from emojidiff.models.adapter import CONFIG_NAME, WEIGHTS_NAME
    from emojidiff.models.bundle import ADAPTER_DIR, MODEL_FILE, read_spec

    src, dest = Path(model), Path(dest)
    spec = read_spec(src, key="--model")
    if not str(spec.backbone).startswith(PREFIX):
        raise ValueError(
            f"{src / MODEL_FILE}: backbone {spec.backbone!r} is not a packaged backbone ({PREFIX}NAME); "
            "a packaged model must not depend on a folder outside the package"
        )
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    files: dict[str, dict] = {}
    dtypes = {
        f"{ADAPTER_DIR}/{WEIGHTS_NAME}": _half(
            src / ADAPTER_DIR / WEIGHTS_NAME, tmp / ADAPTER_DIR / WEIGHTS_NAME
        )
    }
    shutil.copy2(src / ADAPTER_DIR / CONFIG_NAME, tmp / ADAPTER_DIR / CONFIG_NAME)
    if spec.expression_encoder_weights:
        name = spec.expression_encoder_weights
        dtypes[name] = _half(src / name, tmp / name)
    shutil.copy2(src / MODEL_FILE, tmp / MODEL_FILE)
    if (src / "train_record.json").is_file():
        shutil.copy2(src / "train_record.json", tmp / "train_record.json")
    for path in sorted(tmp.rglob("*.safetensors")):
        rel = str(path.relative_to(tmp))
        files[rel] = {
            "bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "source_dtypes": dtypes.get(rel, {}),
            "dtype": "float16",
        }
    record = {"source": str(src), "name": dest.name, "files": files}
    (tmp / "package_record.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def run(opts: PackageOptions) -> Path:
    if opts.dest is None and opts.name not in PACKAGED_MODELS:
        raise ValueError(
            f"--name {opts.name!r} is not a packaged model slot ({', '.join(PACKAGED_MODELS)}); "
            "add it to emojidiff.packaged.PACKAGED_MODELS or pass --dest"
        )
    dest = opts.dest if opts.dest is not None else PACKAGED_MODELS[opts.name]
    out = package_model(opts.model, dest)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    where = f"{PREFIX}{opts.name}" if opts.dest is None else str(out)
    print(f"packaged {opts.model} -> {out} ({size / 1e6:.2f} MB): load it as --model {where}")
    return out
