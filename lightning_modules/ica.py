"""Stage 2, ICA (ID-enhanced Contrast Alignment): one-step reconstruction under identity and
expression supervision, and identity alignment of the passes with and without expression control.

    python -m emojidiff.cli fit -c configs/ica.yaml      # model.init_args.model: TrainedModel of stage 1's model folder

A step, for a batch of triplets (target of A with expression e, reference of A, template of e):

1. Noise the target's latents at t drawn from the truncated range [t_min, t_max] (below).
2. Pass "on": UNet + E-Adapter with the expression branch on. The one-step x0 of its prediction
   is decoded by the VAE *with gradients* ("rapid reconstruction").
3. Pass "off": the same noise, timestep, prompt and identity, the expression branch off (its scale
   0). By default it is a fixed target (no gradients): the alignment moves the expression-on pass
   toward what the identity branch alone makes, not the other way round.
4. Terms (each logged as train/<name>, weighted by `weights`):
   - diffusion: the stage-1 loss of the on pass (a regulariser that keeps the denoiser a denoiser;
     `DecoupledModule`'s, with its Min-SNR and face weighting when set);
   - identity: 1 - cos(E(x0_on), A's embedding), E the *training* identity encoder (on its aligned
     crop: the transform the encoder's aligner finds on the target, re-applied to x0 by `warp_faces`);
   - expression: the training expression analyser's own `distance` (the evaluation's expression
     error: mean absolute difference for the world analysers) of x0_on to the template;
   - align_identity: 1 - cos(E(x0_on), E(x0_off)) (the identity representations of the two passes);
   - align_semantic / align_layout: PuLID's terms on the UNet's identity cross-attention layers,
     mean over layers of |softmax(K Q_on^T/sqrt d) Q_on - softmax(K Q_off^T/sqrt d) Q_off| (K: the
     identity keys) and |Q_on - Q_off|.
   Rows with CFG-dropped identity or expression (the datamodule's flags) give no identity /
   expression / alignment terms (their target is undefined); they keep the diffusion term.

Identity from noise (`sample_steps` > 0; a departure from the paper, PuLID's form). The one-step x0
of a noised *target* already carries the target's identity through the noise, so the identity
loss on it is nearly satisfied without the identity branch learning to make identity from noise.
With `sample_steps` K > 0 the identity and expression terms are computed instead on images
*generated from pure noise* by a K-step DDIM chain (the batch's conditions, CFG `sample_guidance`),
with gradients through its last `sample_grad_steps` steps (the earlier ones run without a graph):
what the model draws at inference, scored as the tables score it. The diffusion and alignment
terms keep the noised target.

Adaptive timestep range (the paper's adaptive noise inversion). At large t a one-step x0 is a
blur the identity encoder cannot recognise, and its identity gradient is noise; at small t it is
the target itself and teaches nothing. Rule: t ~ U[t_min, t_max); every `adapt_every` steps, with
s the mean identity similarity cos(E(x0_on), A) over those steps, t_max <- t_max * `adapt_factor`
when s < `recognise_threshold` (too hard: shrink), t_max <- t_max / `adapt_factor` when
s > `recognise_threshold` + `adapt_margin` (easy: widen), clipped to [`t_max_floor`, `t_max_cap`].
The range is logged (train/t_max) and saved with the checkpoint, so a resumed run continues it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import DDIMScheduler
from torch import Tensor

from emojidiff.face import build_face_aligner
from emojidiff.face.base import ExpressionAnalyser, IdentityEncoder, warp_faces
from emojidiff.images import to_unit
from emojidiff.losses import (
    alignment_layout_loss,
    alignment_semantic_loss,
    identity_loss,
    predicted_x0,
)
from emojidiff.models.bundle import EmojiDiffModel
from lightning_modules.decoupled import DecoupledModule

DEFAULT_WEIGHTS = {
    "diffusion": 1.0,
    "identity": 1.0,
    "expression": 1.0,
    "align_identity": 1.0,
    "align_semantic": 0.6,
    "align_layout": 0.1,
}


class ICAModule(DecoupledModule):
    """Stage 2 (see the module docstring). Arguments of `DecoupledModule` (its diffusion loss options
    shape the diffusion term; with a fresh `model` this is stage 1 with ICA's losses added), plus:

    expression_analyser: the *training* expression analyser (differentiable) of the expression loss
        (None only with weights.expression 0: no differentiable analyser exists for photos here);
        configs: `emojidiff.models.bundle.build_expression_analyser` with `spec: world-expr`.
    loss_identity_encoder: the *training* identity encoder of the identity and alignment losses
        (differentiable, e.g. arcface-torch where the adapter's own is an ONNX model; configs:
        `emojidiff.models.bundle.build_identity_encoder`); None: the model's identity encoder.
        Its embeddings of A come from `ref` (or the shard's id.npy when it is the model's own
        encoder and id_source is "shard").
    weights: {term: weight}; a term with weight 0 is not computed. Keys: diffusion, identity,
        expression, align_identity, align_semantic, align_layout.
    t_min / t_max / t_max_floor / t_max_cap: the timestep range (see the module docstring).
    recognise_threshold / adapt_margin / adapt_factor / adapt_every: the adaptation rule.
    stopgrad_off: the expression-off pass is a fixed target (no gradients through it).
    sample_steps / sample_grad_steps / sample_guidance: identity from noise (see the module
        docstring); 0 steps: the identity and expression terms use the noised target's one-step x0.
    sample_rows: the chain runs on the batch's first `sample_rows` rows only (0: all), which then
        carry the identity and expression terms: the chain costs K UNet passes (2K with CFG) per row.
    """

    @property
    def stage(self) -> str:  # type: ignore[override]
        """ "ica" when it continues a trained model (e.g. `TrainedModel`), else "decoupled": stage 1 with ICA's losses."""
        return "decoupled" if self.model_untrained else "ica"

    def __init__(
        self,
        model: EmojiDiffModel,
        *args: Any,
        expression_analyser: ExpressionAnalyser | None = None,
        loss_identity_encoder: IdentityEncoder | None = None,
        weights: dict[str, float] | None = None,
        t_min: int = 0,
        t_max: int = 600,
        t_max_floor: int = 200,
        t_max_cap: int = 800,
        recognise_threshold: float = 0.5,
        adapt_margin: float = 0.15,
        adapt_factor: float = 0.9,
        adapt_every: int = 20,
        stopgrad_off: bool = True,
        sample_steps: int = 0,
        sample_grad_steps: int = 1,
        sample_guidance: float = 1.0,
        sample_rows: int = 0,
        **kwargs: Any,
    ):
        super().__init__(model, *args, **kwargs)
        if (
            sample_steps < 0
            or (sample_steps and not 1 <= sample_grad_steps <= sample_steps)
            or sample_guidance < 1
        ):
            raise ValueError(
                f"need sample_steps >= 0, 1 <= sample_grad_steps <= sample_steps and sample_guidance "
                f">= 1, got {sample_steps}, {sample_grad_steps}, {sample_guidance}"
            )
        unknown = set(weights or {}) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown ICA loss terms {sorted(unknown)}; known: {sorted(DEFAULT_WEIGHTS)}")
        self.weights = check_weights({**DEFAULT_WEIGHTS, **(weights or {})})
        if not 0 <= t_min < t_max_floor <= t_max <= t_max_cap <= self.scheduler.config.num_train_timesteps:
            raise ValueError(
                f"need 0 <= t_min < t_max_floor <= t_max <= t_max_cap <= T, got "
                f"{t_min}, {t_max_floor}, {t_max}, {t_max_cap}"
            )
        if not 0 < adapt_factor < 1 or adapt_every < 1:
            raise ValueError(
                f"adapt_factor must lie in (0, 1) and adapt_every >= 1, got {adapt_factor}, {adapt_every}"
            )
        if expression_analyser is None and self.weights["expression"] > 0:
            raise ValueError("model.init_args.expression_analyser is null but weights.expression > 0")
        self.expression_analyser = expression_analyser
        self.set_part("loss_identity_encoder", loss_identity_encoder, default=self.identity_encoder)
        for name, net in (
            ("loss_identity_encoder", self.loss_identity_encoder),
            ("expression_analyser", self.expression_analyser),
        ):
            if net is None:
                continue
            if not getattr(net, "differentiable", False):
                raise ValueError(
                    f"ICA back-propagates through model.init_args.{name} but {type(net).__name__} is not "
                    "differentiable; name a torch network (e.g. arcface-torch, world-id, world-expr)"
                )
            net.requires_grad_(False)
        self.t_max = float(t_max)
        self._sims: list[float] = []
        self._aligner = None

    def train(self, mode: bool = True) -> ICAModule:
        super().train(mode)
        for name in ("expression_analyser", "loss_identity_encoder"):
            if getattr(self, name, None) is not None:
                getattr(self, name).train(False)
        return self

    # -- adaptive range --------------------------------------------------------------------------

    def adapt(self, similarity: float) -> None:
        """Record one step's mean x0 identity similarity; every `adapt_every` steps move t_max."""
        hp = self.hparams
        self._sims.append(similarity)
        if len(self._sims) < hp.adapt_every:
            return
        s = sum(self._sims) / len(self._sims)
        self._sims = []
        if s < hp.recognise_threshold:
            self.t_max *= hp.adapt_factor
        elif s > hp.recognise_threshold + hp.adapt_margin:
            self.t_max /= hp.adapt_factor
        self.t_max = min(max(self.t_max, hp.t_max_floor), hp.t_max_cap)

    def stage_state(self) -> dict[str, Any]:
        return {"t_max": self.t_max, "sims": list(self._sims)}

    def load_stage_state(self, state: Mapping[str, Any]) -> None:
        self.t_max = float(state.get("t_max", self.t_max))
        self._sims = [float(s) for s in state.get("sims", [])]

    # -- faces -------------------------------------------------------------------------------------

    def identity_crops(self, images: Tensor, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """(crops the identity encoder takes (B, 3, S, S), ok (B,) bool) of images (B, 3, H, W) in [0, 1].

        Whole images for encoders that align nothing ("none"); else the transform the encoder's
        aligner finds on each *target* (the reconstruction has its pose) re-applied with
        `warp_faces` (differentiable). Rows whose target has no face get ok=False.
        """
        enc = self.loss_identity_encoder
        if enc.aligner_name == "none":
            return images, torch.ones(images.shape[0], dtype=torch.bool, device=images.device)

        if self._aligner is None:
            self._aligner = build_face_aligner(enc.aligner_name)
        aligned = self._aligner.align_batch(
            to_unit(batch["tgt"].float().cpu()), names=list(batch["key"]), on_missing="none"
        )
        ok = torch.tensor([a is not None for a in aligned], device=images.device)
        transforms = [a.transform if a is not None else [[1, 0, 0], [0, 1, 0]] for a in aligned]
        return warp_faces(images, transforms, enc.input_size), ok

    def loss_identity_targets(self, batch: Mapping[str, Any]) -> Tensor:
        """(B, D) embeddings of A under the loss identity encoder (the shard's when it is the adapter's)."""
        if self.loss_identity_encoder is self.identity_encoder:
            return self.identity_embeddings(batch)
        with torch.no_grad():
            ref = to_unit(batch["ref"].to(self.device).float())
            crops, _ = self.identity_crops(ref, {**batch, "tgt": batch["ref"]})
            return self.loss_identity_encoder(crops)

    # -- the step ----------------------------------------------------------------------------------

    def compute_losses(self, batch: Mapping[str, Any], generator: torch.Generator) -> dict[str, Tensor]:
        w = self.weights
        t_high = max(self.hparams.t_min + 1, int(self.t_max))
        latents, noise, t, noisy = self.noised(
            batch, self.hparams.t_min, t_high, generator=generator, sampling=self.timestep_sampling
        )
        ehs, added = self.condition(batch)
        need_align = w["align_identity"] > 0 or w["align_semantic"] > 0 or w["align_layout"] > 0
        with self.adapter.recording() as rec_on:
            pred_on = self.unet(noisy, t, ehs, added)
        terms: dict[str, Tensor] = {}
        if w["diffusion"] > 0:
            terms["diffusion"] = w["diffusion"] * self.diffusion_term(batch, pred_on, latents, noise, t)
        sampled = self.hparams.sample_steps > 0 and (w["identity"] > 0 or w["expression"] > 0)
        # the noised target's x0 needs a graph for its identity/expression terms (unless the sampled
        # images take them) and for align_identity; otherwise it only drives the timestep range
        with torch.set_grad_enabled(torch.is_grad_enabled() and (not sampled or w["align_identity"] > 0)):
            x0_on = self.decode(predicted_x0(noisy, pred_on, self.alphas_cumprod, t, self.prediction_type))
            crops_on, found = self.identity_crops(x0_on, batch)
            emb_on = self.loss_identity_encoder(crops_on)
        keep = ~(batch["drop_id"].to(self.device) | batch["drop_expr"].to(self.device)) & found
        target_id = self.loss_identity_targets(batch)
        id_term = identity_loss(emb_on, target_id)
        self.adapt(float((1 - id_term.detach()).mean()))
        self.log("train/t_max", self.t_max, batch_size=len(t))
        self.log("train/x0_identity_similarity", (1 - id_term.detach()).mean(), batch_size=len(t))
        supervised, sup_keep, sup_batch = x0_on, keep, batch
        if sampled:
            n = self.hparams.sample_rows or len(t)
            rows = {k: v[:n] if isinstance(v, (Tensor, list, tuple)) else v for k, v in batch.items()}
            added_rows = None if added is None else {k: v[:n] for k, v in added.items()}
            supervised = self.decode(self.sample_from_noise(rows, ehs[:n], added_rows, generator))
            id_term = identity_loss(
                self.loss_identity_encoder(self.identity_crops(supervised, rows)[0]), target_id[:n]
            )
            sup_keep, sup_batch = keep[:n], rows
            self.log("train/sampled_identity_similarity", (1 - id_term.detach()).mean(), batch_size=n)
        if w["identity"] > 0:
            terms["identity"] = w["identity"] * masked(id_term, sup_keep)
        if w["expression"] > 0:
            ana = self.expression_analyser
            with torch.no_grad():
                want = ana(to_unit(sup_batch["tmpl"].to(self.device)))
            terms["expression"] = w["expression"] * masked(ana.distance(ana(supervised), want), sup_keep)
        if need_align:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.hparams.stopgrad_off):
                old = self.adapter.config.expr_scale
                self.adapter.set_scales(expr_scale=0.0)
                try:
                    with self.adapter.recording() as rec_off:
                        pred_off = self.unet(noisy, t, ehs, added)
                finally:
                    self.adapter.set_scales(expr_scale=old)
                x0_off = None
                if w["align_identity"] > 0:
                    x0_off = self.decode(
                        predicted_x0(noisy, pred_off, self.alphas_cumprod, t, self.prediction_type)
                    )
                    emb_off = self.loss_identity_encoder(self.identity_crops(x0_off, batch)[0])
            if w["align_identity"] > 0:
                terms["align_identity"] = w["align_identity"] * masked(identity_loss(emb_on, emb_off), keep)
            if w["align_semantic"] > 0 or w["align_layout"] > 0:
                sem, lay = attention_alignment(rec_on, rec_off)
                if w["align_semantic"] > 0:
                    terms["align_semantic"] = w["align_semantic"] * masked(sem, keep)
                if w["align_layout"] > 0:
                    terms["align_layout"] = w["align_layout"] * masked(lay, keep)
        return terms

    def sample_from_noise(
        self,
        batch: Mapping[str, Any],
        ehs: Tensor,
        added: dict[str, Tensor] | None,
        generator: torch.Generator,
    ) -> Tensor:
        """Latents x0 (B, C, h, w) generated from pure noise by a `sample_steps`-step DDIM chain under the
        batch's conditions `ehs`, CFG `sample_guidance` against the null text and tokens; gradients flow
        through the last `sample_grad_steps` steps (the x0 prediction of the last step is returned)."""

        hp = self.hparams
        sched = DDIMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(hp.sample_steps, device=self.device)
        b = ehs.shape[0]
        latents_shape = (b, self.backbone.unet.config.in_channels, *self._latent_size(batch))
        z = torch.randn(latents_shape, device=self.device, generator=generator) * sched.init_noise_sigma
        null = None
        if hp.sample_guidance != 1.0:
            null_text = self.text_states([""] * b)
            null_tokens = self.adapter.encode_conditions(
                torch.zeros(b, self.adapter.config.id_embed_dim, device=self.device),
                None,
                drop_id=True,
                drop_expr=True,
            )
            null = self.adapter.build_encoder_hidden_states(null_text["encoder_hidden_states"], null_tokens)
        n = len(sched.timesteps)
        x0 = z
        for i, step_t in enumerate(sched.timesteps):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= n - hp.sample_grad_steps):
                t = step_t.expand(b)
                pred = self.unet(z, t, ehs, added)
                if null is not None:
                    pred = pred + (hp.sample_guidance - 1.0) * (pred - self.unet(z, t, null, added))
                if i == n - 1:
                    x0 = predicted_x0(z, pred, self.alphas_cumprod, t, self.prediction_type)
                else:
                    z = sched.step(pred, step_t, z).prev_sample
        return x0

    def _latent_size(self, batch: Mapping[str, Any]) -> tuple[int, int]:
        f = self.backbone.vae_scale_factor
        return batch["tgt"].shape[-2] // f, batch["tgt"].shape[-1] // f

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images (B, 3, H, W) in [0, 1], differentiable (the VAE's weights are frozen)."""
        return to_unit(self.backbone.decode_latents(latents).float())


def check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Loss weights must be finite and >= 0."""
    bad = {k: v for k, v in weights.items() if not (math.isfinite(v) and v >= 0)}
    if bad:
        raise ValueError(f"loss weights must be finite and >= 0, got {bad}")
    return dict(weights)


def masked(values: Tensor, keep: Tensor) -> Tensor:
    """values (B,) with the rows not kept zeroed, rescaled so the mean is over the kept rows (0 if none)."""
    k = keep.to(values.dtype)
    return values * k * (len(k) / k.sum().clamp_min(1.0))


def attention_alignment(
    rec_on: Mapping[str, list[dict[str, Tensor]]], rec_off: Mapping[str, list[dict[str, Tensor]]]
) -> tuple[Tensor, Tensor]:
    """Mean over the identity layers of the semantic and layout alignment terms, (B,) each.

    rec_on / rec_off: `EAdapter.recording()` of one UNet call each; the identity keys of the
    on pass serve both (the identity tokens are the same in both passes).
    """
    sems, lays = [], []
    for name, calls in rec_on.items():
        on, off = calls[-1], rec_off[name][-1]
        sems.append(alignment_semantic_loss(on["id_keys"], on["query"], off["query"]))
        lays.append(alignment_layout_loss(on["query"], off["query"]))
    if not sems:
        raise ValueError("the adapter has no identity layers: contrast alignment needs them")
    return torch.stack(sems).mean(0), torch.stack(lays).mean(0)
