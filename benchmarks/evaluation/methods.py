"""Methods under evaluation, behind one interface: `generate(batch) -> Generated`, in a registry.

Every method sees the same `EvalInputs` (the protocol rows with their reference, template,
template mask and, on the world, the ground-truth answer) and returns one uint8 image per row,
or marks the row failed with a reason (reported in the tables, never dropped).

Registered ("name" in the evaluation config's `methods`):

- `ground-truth` (world): the reference identity rendered with the template's expression in the
  row's style and scene: the upper bound;
- `vae-oracle` (world): that render through the backbone's VAE: the ceiling of any latent method;
- `emojidiff`: an E-Adapter model folder (`model`), or, with `model: null`, a fresh untrained
  adapter on `backbone` (seeded; its numbers are a floor, and the table says "untrained");
- `identity-only`: the same with the expression branch off (expression scale 0): the
  IP-Adapter-FaceID-style row;
- `two-stage`: generate with identity only, then transfer the template's expression: on the world
  by re-noising and re-denoising the face region with the expression branch on; on photos with a
  local one-call ONNX reenactment model (`reenactor`, `benchmarks.evaluation.baselines.reenactment`);
- `ip-adapter-faceid` (`benchmarks.evaluation.baselines.ip_adapter_faceid`): SD1.5 + IP-Adapter-FaceID from
  local folders through diffusers' `load_ip_adapter` (identity only, a published baseline).
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch

from benchmarks.evaluation.baselines.reenactment import Reenactor
from benchmarks.evaluation.protocol import ProtocolRow
from emojidiff.errors import FaceNotFoundError
from emojidiff.face.analyse import embed_identities
from emojidiff.face.masks import landmark_mask, mask_aligner
from emojidiff.images import load_image, to_signed, to_tensor, to_uint8, to_unit
from emojidiff.models.backbone import Backbone
from emojidiff.models.bundle import fresh_model, load_model, model_fingerprint
from emojidiff.registry import Registry
from emojidiff.world import Expression, Identity, render_batch
from emojidiff.world.masks import world_prior_mask

log = logging.getLogger(__name__)

#: Style of world identity references: a realistic photo of the person, whatever the output style.
REFERENCE_STYLE = "shaded"


@dataclass
class EvalInputs:
    """The inputs of B protocol rows.

    references / templates: uint8 (B, S, S, 3) RGB; template_masks: float32 (B, S, S) in [0, 1].
    ground_truth: uint8 (B, S, S, 3), the reference identity wearing the template's expression in
        the row's style (world rows; None for file rows).
    template_params / reference_identity_params: (B, 10) / (B, 18) float32 world ground truth or None.
    """

    rows: list[ProtocolRow]
    references: np.ndarray
    templates: np.ndarray
    template_masks: np.ndarray
    ground_truth: np.ndarray | None = None
    template_params: np.ndarray | None = None
    reference_identity_params: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class Generated:
    """images: uint8 (B, S, S, 3) (zeros where failed); ok: (B,) bool; errors: B strings ("" if ok)."""

    images: np.ndarray
    ok: np.ndarray
    errors: list[str] = field(default_factory=list)


def world_inputs(rows: Sequence[ProtocolRow], size: int) -> EvalInputs:
    """Render the references, templates (with masks) and ground truths of world rows."""
    ids = [Identity.sample(r.ref_identity) for r in rows]
    tmpl_ids = [Identity.sample(r.tmpl_identity) for r in rows]
    tmpl_ex = [Expression.sample(r.tmpl_expression_seed) for r in rows]
    ref = render_batch(
        ids,
        [Expression.sample(r.ref_expression_seed) for r in rows],
        REFERENCE_STYLE,
        size,
        [r.ref_scene_seed for r in rows],
    )
    tmpl = render_batch(
        tmpl_ids, tmpl_ex, [r.tmpl_style for r in rows], size, [r.tmpl_scene_seed for r in rows]
    )
    gt = render_batch(ids, tmpl_ex, [r.style for r in rows], size, [r.seed for r in rows])
    return EvalInputs(
        rows=list(rows),
        references=ref.images.numpy(),
        templates=tmpl.images.numpy(),
        template_masks=tmpl.masks.numpy().astype(np.float32),
        ground_truth=gt.images.numpy(),
        template_params=np.stack([e.to_vector() for e in tmpl_ex]),
        reference_identity_params=np.stack([i.to_vector() for i in ids]),
    )


def file_inputs(rows: Sequence[ProtocolRow], size: int, aligner_name: str = "dlib-chip") -> EvalInputs:
    """Read the reference and template files of file rows (square-cropped to `size`); template
    masks from the aligner's landmark hull (ones where no face is found)."""

    refs = np.stack([load_image(r.ref_path, "identity reference", size) for r in rows])
    tmpls = np.stack([load_image(r.tmpl_path, "expression template", size) for r in rows])
    aligner = mask_aligner(aligner_name)
    masks = []
    for r, t in zip(rows, tmpls, strict=True):
        try:
            masks.append(landmark_mask(t, aligner, r.tmpl_path))
        except FaceNotFoundError:
            log.warning("row %d: no face in template %s; it is used unmasked", r.row_id, r.tmpl_path)
            masks.append(np.ones(t.shape[:2], np.float32))
    return EvalInputs(rows=list(rows), references=refs, templates=tmpls, template_masks=np.stack(masks))


def load_inputs(rows: Sequence[ProtocolRow], size: int) -> EvalInputs:
    kinds = {r.kind for r in rows}
    if kinds == {"world"}:
        return world_inputs(rows, size)
    if kinds == {"files"}:
        return file_inputs(rows, size)
    raise ValueError(f"a batch mixes protocol kinds {sorted(kinds)}")


@torch.no_grad()
def sample_rows(
    pipe: Any,
    inputs: EvalInputs,
    sampling: Mapping[str, Any],
    mask_templates: bool = True,
    batch_size: int = 32,
    init: np.ndarray | None = None,
) -> Generated:
    """One image per row from an `EmojiDiffPipeline` (a loaded model folder, or a model in training).

    The identity comes from the pipeline's identity encoder on each row's reference (a row whose
    reference has no face fails, named); each row's noise is seeded by its protocol seed.
    sampling: pipeline arguments (num_inference_steps, guidance_scale, scheduler, id_scale,
    expr_scale; `init_mask` (1, 1, S, S) for the two-stage method). init: uint8 (B, S, S, 3) images
    to start from (SDEdit), or None.
    """

    size = inputs.references.shape[1]
    out, ok, errors = np.zeros_like(inputs.references), np.zeros(len(inputs), bool), [""] * len(inputs)
    names = [f"row {r.row_id} reference" for r in inputs.rows]
    emb = embed_identities(pipe.identity_encoder, list(inputs.references), names, on_missing="nan")
    sampling = dict(sampling)
    init_mask = sampling.pop("init_mask", None)  # (1, 1, S, S), the same face region for every row
    for a in range(0, len(inputs), batch_size):
        rows = np.arange(a, min(a + batch_size, len(inputs)))
        good = rows[torch.isfinite(emb[rows]).all(dim=1).numpy()]
        for r in set(rows) - set(good):
            errors[r] = "no face in the identity reference"
        if len(good) == 0:
            continue
        masks = torch.from_numpy(inputs.template_masks[good])[:, None] if mask_templates else None
        extra = {} if init is None else {"init_image": to_tensor(list(init[good])).to(pipe.device)}
        if init_mask is not None:
            extra["init_mask"] = init_mask.expand(len(good), -1, -1, -1)
        result = pipe(
            to_tensor(list(inputs.templates[good])).to(pipe.device),
            id_embeds=emb[good].to(pipe.device),
            id_image=to_tensor(list(inputs.references[good])).to(pipe.device)
            if pipe.adapter.uses_id_features
            else None,
            expr_mask=None if masks is None else masks.to(pipe.device),
            prompt=[inputs.rows[i].prompt for i in good],
            generator=[torch.Generator("cpu").manual_seed(inputs.rows[i].seed) for i in good],
            height=size,
            width=size,
            **sampling,
            **extra,
        )
        out[good], ok[good] = result.images, True
    return Generated(out, ok, errors)


class Method(abc.ABC):
    """A method under evaluation. `describe()` goes into the run record and the table's notes."""

    name: str = "abstract"
    #: Needs world ground truth (cannot run on file rows).
    world_only: bool = False

    def to(self, device: torch.device | str) -> Method:
        return self

    @abc.abstractmethod
    def generate(self, inputs: EvalInputs) -> Generated:
        """One image per row of `inputs`."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


METHODS: Registry[Method] = Registry("evaluation method")


def _check_world(method: Method, inputs: EvalInputs) -> None:
    if inputs.ground_truth is None:
        raise ValueError(f"method {method.name!r} needs world rows (ground truth)")


@METHODS.register("ground-truth")
class GroundTruth(Method):
    """The reference identity rendered with the template's expression: the upper bound."""

    name = "ground-truth"
    world_only = True

    def generate(self, inputs: EvalInputs) -> Generated:
        _check_world(self, inputs)
        return Generated(inputs.ground_truth.copy(), np.ones(len(inputs), bool), [""] * len(inputs))


@METHODS.register("vae-oracle")
class VAEOracle(Method):
    """The ground truth encoded and decoded by the backbone's VAE (posterior mode)."""

    name = "vae-oracle"
    world_only = True

    def __init__(self, backbone: str = "emojidiff:tiny-sd15", batch_size: int = 64):

        self.backbone_path, self.batch_size = backbone, batch_size
        self.backbone = Backbone.from_folder(backbone, key="methods.vae-oracle.backbone")

    def to(self, device: torch.device | str) -> VAEOracle:
        self.backbone.to(device)
        return self

    @torch.no_grad()
    def generate(self, inputs: EvalInputs) -> Generated:
        _check_world(self, inputs)
        out = []
        for a in range(0, len(inputs), self.batch_size):
            x = to_signed(to_tensor(inputs.ground_truth[a : a + self.batch_size]))
            y = self.backbone.decode_latents(self.backbone.encode_images(x, sample=False))
            out.append(to_uint8(to_unit(y.float())))
        return Generated(np.concatenate(out), np.ones(len(inputs), bool), [""] * len(inputs))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "backbone": self.backbone_path}


@METHODS.register("emojidiff")
class EmojiDiffMethod(Method):
    """An EmojiDiff model folder, or a fresh untrained adapter (`model: null`) on `backbone`.

    steps / guidance / scheduler: sampling; id_scale / expr_scale: branch weights (None: the
    model's); mask_templates: give the template's face mask to the expression encoder.
    """

    name = "emojidiff"

    def __init__(
        self,
        model: str | None = None,
        backbone: str = "emojidiff:tiny-sd15",
        adapter_seed: int = 0,
        steps: int = 30,
        guidance: float = 5.0,
        scheduler: str = "ddim",
        id_scale: float | None = None,
        expr_scale: float | None = None,
        mask_templates: bool = True,
        batch_size: int = 32,
    ):

        self.model_path, self.backbone_path = model, backbone
        self.model = load_model(model) if model else fresh_model(backbone, seed=adapter_seed)
        self.sampling = {
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "scheduler": scheduler,
            "id_scale": id_scale,
            "expr_scale": expr_scale,
        }
        self.mask_templates, self.batch_size = mask_templates, batch_size

    def to(self, device: torch.device | str) -> EmojiDiffMethod:
        self.model.pipeline.to(device)
        return self

    def generate(self, inputs: EvalInputs) -> Generated:
        return self._generate(inputs)

    def _generate(self, inputs: EvalInputs, init: np.ndarray | None = None, **overrides: Any) -> Generated:
        """One image per row; `init` (uint8 (B, S, S, 3)) and `overrides` (pipeline arguments such
        as expr_scale, strength, init_mask) serve the two-stage method."""
        return sample_rows(
            self.model.pipeline,
            inputs,
            {**self.sampling, **overrides},
            self.mask_templates,
            self.batch_size,
            init,
        )

    def describe(self) -> dict[str, Any]:

        # the weights' fingerprint too: a model retrained at the same path must not reuse cached generations
        weights = model_fingerprint(self.model_path) if self.model_path else None
        return {
            "name": self.name,
            "model": self.model_path or f"untrained adapter on {self.backbone_path}",
            "weights": weights,
            "untrained": self.model.untrained,
            **{k: v for k, v in self.sampling.items() if v is not None},
        }


@METHODS.register("identity-only")
class IdentityOnly(EmojiDiffMethod):
    """The E-Adapter with its expression branch off (expression scale 0): identity and prompt only."""

    name = "identity-only"

    def __init__(self, **kwargs: Any):
        kwargs["expr_scale"] = 0.0
        super().__init__(**kwargs)


@METHODS.register("two-stage")
class TwoStage(EmojiDiffMethod):
    """Generate, then animate: the portrait is generated with identity only (expression branch off),
    then the template's expression is put on it.

    World rows: the face region of the first image (the world's face prior) is re-noised to
    `strength` and denoised again with the expression branch on, the rest of the first image kept
    at every step (the LivePortrait-style pipelines' shape, on the world).
    File rows: a local reenactment model does the second stage (`reenactor`: a one-call .onnx, see
    `benchmarks.evaluation.baselines.reenactment`; `reenactor_size`: its crop side when the graph's is
    dynamic); rows without a face in the generated image or the template fail with the reason.
    File rows without `reenactor` are refused: the world face prior means nothing on photos. World
    rows always re-noise, with or without `reenactor`.
    """

    name = "two-stage"

    def __init__(
        self,
        strength: float = 0.6,
        reenactor: str | None = None,
        reenactor_size: int | None = None,
        **kwargs: Any,
    ):

        self.reenactor_path = reenactor
        self.reenactor = (
            None if reenactor is None else Reenactor(reenactor, size=reenactor_size, key="reenactor")
        )
        super().__init__(**kwargs)
        self.strength = float(strength)

    def generate(self, inputs: EvalInputs) -> Generated:
        if inputs.ground_truth is None:
            return self._reenact(inputs)

        first = self._generate(inputs, expr_scale=0.0)
        prior = world_prior_mask(inputs.references.shape[1])
        second = self._generate(
            inputs, init=first.images, strength=self.strength, init_mask=torch.from_numpy(prior)[None, None]
        )
        # paste the regenerated face back: outside it the first image stays exactly (the VAE round trip would blur it)
        alpha = cv2.GaussianBlur(prior, (0, 0), 1.0)[None, ..., None]
        images = (alpha * second.images + (1 - alpha) * first.images + 0.5).astype(np.uint8)
        errors = [e1 or e2 for e1, e2 in zip(first.errors, second.errors, strict=True)]
        return Generated(images, first.ok & second.ok, errors)

    def _reenact(self, inputs: EvalInputs) -> Generated:
        """File rows: identity-only generation, then the reenactor with the row's template as driving face."""
        if self.reenactor is None:
            raise ValueError(
                "two-stage on file rows (photos) needs a reenactment model: set methods.<label>.init_args.reenactor "
                "to a one-call reenactment .onnx (benchmarks/evaluation/baselines/reenactment.py); the world's re-noising "
                "uses the world face prior, which means nothing on photos"
            )
        first = self._generate(inputs, expr_scale=0.0)
        images, ok, errors = np.zeros_like(first.images), first.ok.copy(), list(first.errors)
        good = np.flatnonzero(first.ok)
        images[good], ok[good], reasons = self.reenactor.reenact_batch(
            first.images[good], inputs.templates[good]
        )
        for i, reason in zip(good, reasons, strict=True):
            errors[i] = reason
        return Generated(images, ok, errors)

    def describe(self) -> dict[str, Any]:
        out = {**super().describe(), "name": self.name, "strength": self.strength}
        if self.reenactor is not None:  # only then: world runs keep their record (and generation cache)
            out |= {"reenactor": self.reenactor_path, "reenactor_size": self.reenactor.size}
        return out


def build_methods(specs: Mapping[str, Any]) -> dict[str, Method]:
    """{label: spec} -> {label: Method} (labels are the table's row names)."""
    return {label: METHODS.build(spec) for label, spec in specs.items()}
