"""IP-Adapter-FaceID (Ye et al., h94/IP-Adapter-FaceID) on SD1.5 as an evaluation method.

Loaded by diffusers' own code, offline (`local_files_only=True`, nothing is downloaded):
`StableDiffusionPipeline.from_pretrained(sd_folder)` then
`pipe.load_ip_adapter(ip_adapter_folder, subfolder, weight_name, image_encoder_folder=None)`.
FaceID has no CLIP image encoder: its condition is the L2-normalised face-recognition embedding
of the reference (ArcFace, 512-d; the released model was trained on insightface buffalo_l),
handed to the pipeline as `ip_adapter_image_embeds`.

Layout expected (init args of `methods.<label>` in the evaluation config):

    sd_folder/                   a diffusers SD1.5 folder (safetensors): model_index.json, unet/,
                                 vae/, text_encoder/, tokenizer/, scheduler/ (a safety checker, if
                                 present, is not loaded); `emojidiff:tiny-sd15` names the packaged one
    ip_adapter_folder/[subfolder/]
        weight_name              ip-adapter-faceid_sd15.bin (torch zip, read with weights_only) or a
                                 .safetensors with the same keys prefixed: image_proj.{proj.0,proj.2,
                                 norm}.{weight,bias}; ip_adapter.{k}.to_{k,v}_ip.weight for the k-th
                                 attention processor of the UNet (cross-attention ones: k = 1, 3, ...)
                                 and, in the released .bin, the FaceID LoRA as ip_adapter.{k}.to_*_lora.*
        lora_weight_name         optional: the LoRA as a separate file (ip-adapter-faceid_sd15_lora
                                 .safetensors), for weight files that do not embed it
    identity_encoder             an `emojidiff.face` spec whose embedding_dim equals the adapter's
                                 id dim, e.g. {name: insightface-arcface, init_args: {model_dir: buffalo_l/}}

Both LoRA routes need diffusers' PEFT backend (the `peft` package). Without it, a LoRA is an
error naming its config key, unless `require_lora: false` (the run then uses the adapter alone
and `describe()` says so).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.utils import USE_PEFT_BACKEND
from safetensors import safe_open

from benchmarks.evaluation.methods import METHODS, EvalInputs, Generated, Method
from emojidiff import _quiet
from emojidiff.errors import MissingWeightsError
from emojidiff.face import build_identity_encoder
from emojidiff.face.analyse import embed_identities
from emojidiff.models.backbone import _check_folder
from emojidiff.models.pipeline import load_sd_pipeline
from emojidiff.packaged import resolve_backbone

#: Config path of this method's init args; `<label>` is the method's label in `methods`.
KEY = "methods.<label>.init_args"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_FACEID_KEYS = ("image_proj.proj.0.weight", "image_proj.proj.2.weight", "image_proj.norm.weight")
_DEFAULT_ENCODER = {"name": "insightface-arcface", "init_args": {"model_dir": None}}


def weight_keys(path: Path) -> set[str]:
    """Flat key names ("image_proj.x", "ip_adapter.x") of an IP-Adapter weight file.

    .safetensors: its keys; .bin: the nested {"image_proj": {...}, "ip_adapter": {...}} dict,
    read with `weights_only=True` (memory-mapped, nothing unpickled beyond tensors).
    """
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return set(f.keys())
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {f"{part}.{k}" for part, sub in state.items() if isinstance(sub, dict) for k in sub}


def _peft_available() -> bool:

    return bool(USE_PEFT_BACKEND)


def _peft_error(key: str, what: str) -> RuntimeError:
    return RuntimeError(
        f"config key `{key}`: {what} needs diffusers' PEFT backend, and the `peft` package is not "
        f"installed. Install peft, or set `{KEY}.require_lora: false` to run the adapter without "
        "its LoRA."
    )


@METHODS.register("ip-adapter-faceid")
class IPAdapterFaceID(Method):
    """IP-Adapter-FaceID: prompt + the reference's face-recognition embedding; no expression input.

    scale: the IP-Adapter scale of every cross-attention layer. steps / guidance / scheduler /
    negative_prompt: sampling (scheduler built from the folder's scheduler config: "ddim",
    "dpm++", "euler", "ddpm"). batch_size: prompts per pipeline call (rows of one reference).
    dtype: "float32" | "float16" | "bfloat16" for every weight.
    """

    name = "ip-adapter-faceid"

    def __init__(
        self,
        sd_folder: str | None = None,
        ip_adapter_folder: str | None = None,
        weight_name: str = "ip-adapter-faceid_sd15.bin",
        subfolder: str | None = None,
        lora_weight_name: str | None = None,
        require_lora: bool = True,
        identity_encoder: Any = None,
        steps: int = 30,
        guidance: float = 7.5,
        scale: float = 1.0,
        scheduler: str = "ddim",
        negative_prompt: str = "",
        batch_size: int = 8,
        dtype: str = "float32",
    ):

        if dtype not in _DTYPES:
            raise ValueError(f"`{KEY}.dtype` must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        self.sd_folder = self._check_sd_folder(sd_folder)
        self.weight_file = self._check_file("ip_adapter_folder", ip_adapter_folder, subfolder, weight_name)
        keys = weight_keys(self.weight_file)
        self._check_faceid(keys)
        self.lora_file, self.lora = self._plan_lora(
            keys, ip_adapter_folder, subfolder, lora_weight_name, require_lora
        )
        self.encoder_spec = _DEFAULT_ENCODER if identity_encoder is None else identity_encoder
        try:
            self.identity_encoder = build_identity_encoder(self.encoder_spec).eval()
        except MissingWeightsError as err:
            raise MissingWeightsError(
                f"{KEY}.identity_encoder.init_args.{err.key}",
                err.path,
                err.expected,
                "the face-recognition model FaceID was trained with (insightface buffalo_l)",
            ) from None
        self.pipe = self._load_pipeline(
            _DTYPES[dtype], scheduler, Path(ip_adapter_folder), subfolder, weight_name
        )
        id_dim = self.pipe.unet.encoder_hid_proj.image_projection_layers[0].ff.net[0].proj.in_features
        if id_dim != self.identity_encoder.embedding_dim:
            raise ValueError(
                f"`{KEY}.identity_encoder` gives {self.identity_encoder.embedding_dim}-d embeddings but "
                f"{self.weight_file} expects {id_dim}-d ones"
            )
        self.pipe.set_ip_adapter_scale(float(scale))
        self.sampling = {"num_inference_steps": steps, "guidance_scale": guidance}
        self.scale, self.scheduler, self.negative_prompt = float(scale), scheduler, negative_prompt
        self.batch_size, self.dtype = batch_size, dtype

    # -- loading -------------------------------------------------------------------------------

    @staticmethod
    def _check_sd_folder(sd_folder: str | None) -> Path:
        """The resolved SD1.5 folder; MissingWeightsError naming `sd_folder` and the missing files."""

        folder, kind = _check_folder(
            None if sd_folder is None else resolve_backbone(sd_folder), f"{KEY}.sd_folder", None, None
        )
        if kind != "sd15":
            raise ValueError(
                f"`{KEY}.sd_folder` {folder} is an {kind} folder; this baseline is the SD1.5 FaceID"
            )
        return folder

    @staticmethod
    def _check_file(arg: str, folder: str | None, subfolder: str | None, name: str) -> Path:
        """`folder/[subfolder/]name`, which must be a .bin or .safetensors file."""
        rel = f"{subfolder}/{name}" if subfolder else name
        hint = "the IP-Adapter-FaceID release (h94/IP-Adapter-FaceID), downloaded beforehand"
        if folder is None:
            raise MissingWeightsError(f"{KEY}.ip_adapter_folder", None, [rel], hint)
        path = Path(folder) / rel
        if not path.is_file():
            raise MissingWeightsError(f"{KEY}.{arg}", folder, [rel], hint)
        if path.suffix not in (".bin", ".safetensors"):
            raise ValueError(f"`{KEY}.{arg}`: {path} must be a .bin or .safetensors file")
        return path

    def _plan_lora(
        self,
        keys: set[str],
        folder: str | None,
        subfolder: str | None,
        lora_weight_name: str | None,
        require_lora: bool,
    ) -> tuple[Path | None, str]:
        """(the separate LoRA file to load or None, what `describe()` reports). The released .bin
        embeds the LoRA (ip_adapter.{k}.to_*_lora.*; load_ip_adapter applies it through PEFT)."""
        embedded = any("_lora." in k for k in keys if k.startswith("ip_adapter."))
        lora_file = None
        if lora_weight_name is not None:
            if embedded:
                raise ValueError(
                    f"`{KEY}.weight_name` {self.weight_file} already holds the FaceID LoRA (load_ip_adapter "
                    f"applies it); `{KEY}.lora_weight_name` would apply it twice: drop one"
                )
            lora_file = self._check_file("lora_weight_name", folder, subfolder, lora_weight_name)
        if not embedded and lora_file is None:
            return None, "none"
        if _peft_available():
            return lora_file, "embedded" if embedded else str(lora_file)
        if require_lora:
            what = f"the FaceID LoRA inside {self.weight_file}" if embedded else f"the LoRA {lora_file}"
            raise _peft_error(f"{KEY}.{'weight_name' if embedded else 'lora_weight_name'}", what)
        return None, "skipped (peft not installed)"

    def _check_faceid(self, keys: set[str]) -> None:
        missing = [k for k in _FACEID_KEYS if k not in keys]
        plus = "image_proj.perceiver_resampler.proj_in.weight" in keys
        if missing or plus or not any(k.endswith(".to_k_ip.weight") for k in keys):
            kind = (
                "FaceID-Plus (it needs CLIP image features too)"
                if plus
                else f"lacks {missing or 'to_k_ip weights'}"
            )
            raise ValueError(
                f"`{KEY}.weight_name` {self.weight_file} is not an IP-Adapter-FaceID file: {kind}"
            )

    def _load_pipeline(
        self, dtype: torch.dtype, scheduler: str, ip_folder: Path, subfolder: str | None, weight_name: str
    ) -> Any:

        _quiet.install()
        pipe = load_sd_pipeline(self.sd_folder, scheduler, dtype)
        pipe.load_ip_adapter(
            str(ip_folder),
            subfolder=subfolder,
            weight_name=weight_name,
            image_encoder_folder=None,
            local_files_only=True,
        )
        if self.lora_file is not None:
            pipe.load_lora_weights(
                str(self.lora_file.parent),
                weight_name=self.lora_file.name,
                adapter_name="faceid_lora",
                local_files_only=True,
            )
        return pipe

    # -- running -------------------------------------------------------------------------------

    def to(self, device: torch.device | str) -> IPAdapterFaceID:
        self.pipe.to(device)
        self.identity_encoder.to(device)
        return self

    def id_embeds(self, embedding: torch.Tensor) -> list[torch.Tensor]:
        """(1, D) L2-normalised identity embedding -> diffusers' `ip_adapter_image_embeds` for one
        call (every prompt of it): [(2, 1, D)], the zero (unconditional) embedding first, when
        guidance applies (what `prepare_ip_adapter_image_embeds` splits with `.chunk(2)`); else
        [(1, 1, D)]. The middle axis is diffusers' "images per adapter" (one here)."""
        if embedding.shape[0] != 1:
            raise ValueError(f"one identity per pipeline call, got embeddings {tuple(embedding.shape)}")
        emb = embedding[:, None].to(self.pipe.device, self.pipe.dtype)
        cfg = self.sampling["guidance_scale"] > 1 and self.pipe.unet.config.time_cond_proj_dim is None
        return [torch.cat([torch.zeros_like(emb), emb]) if cfg else emb]

    @torch.no_grad()
    def generate(self, inputs: EvalInputs) -> Generated:
        """One uint8 (S, S, 3) image per row at the reference size S; a row whose reference has no
        face (no identity embedding) fails with that reason.

        One pipeline call conditions every prompt on one identity: StableDiffusionPipeline repeats
        `ip_adapter_image_embeds` for each prompt, so a batch of B different identities would make
        each image attend to all B. Rows are therefore batched per reference image (FaceID ignores
        the template), up to `batch_size` prompts, each with its own seed.
        """

        size = inputs.references.shape[1]
        out, ok, errors = np.zeros_like(inputs.references), np.zeros(len(inputs), bool), [""] * len(inputs)
        names = [f"row {r.row_id} reference" for r in inputs.rows]
        emb = embed_identities(self.identity_encoder, list(inputs.references), names, on_missing="nan")
        found = torch.isfinite(emb).all(dim=1).numpy()
        for r in np.flatnonzero(~found):
            errors[r] = "no face in the identity reference"
        groups: dict[bytes, list[int]] = {}
        for r in np.flatnonzero(found):
            groups.setdefault(inputs.references[r].tobytes(), []).append(int(r))
        for same_reference in groups.values():
            for a in range(0, len(same_reference), self.batch_size):
                rows = same_reference[a : a + self.batch_size]
                result = self.pipe(
                    prompt=[inputs.rows[i].prompt for i in rows],
                    negative_prompt=[self.negative_prompt] * len(rows),
                    ip_adapter_image_embeds=self.id_embeds(emb[rows[:1]]),
                    generator=[torch.Generator("cpu").manual_seed(inputs.rows[i].seed) for i in rows],
                    height=size,
                    width=size,
                    output_type="np",
                    **self.sampling,
                )
                out[rows] = (np.clip(result.images, 0, 1) * 255).round().astype(np.uint8)
                ok[rows] = True
        return Generated(out, ok, errors)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sd_folder": str(self.sd_folder),
            "ip_adapter": str(self.weight_file),
            "lora": self.lora,
            "identity_encoder": self.encoder_spec,
            "scale": self.scale,
            "scheduler": self.scheduler,
            "negative_prompt": self.negative_prompt,
            "dtype": self.dtype,
            **self.sampling,
        }
