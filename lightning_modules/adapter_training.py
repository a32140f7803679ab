"""What both training stages share: the model parts, conditioning, EMA, validation, checkpoints, export.

`AdapterTrainingModule` is the base of `DecoupledModule` (stage 1) and `ICAModule` (stage 2).
It receives its parts built: `model`, an `emojidiff.models.bundle.EmojiDiffModel` (backbone, attached
E-Adapter, identity and expression encoders, and the spec its export writes; the configs build it
with `FreshModel` or, to start from a model folder, `TrainedModel`), the validation scorers, and
the optimizer and learning-rate schedule as callables (`emojidiff.optim`; LightningCLI builds all
of them from `class_path`/`init_args`). The module builds nothing from names.

Trainable: the E-Adapter (projections and new K/V), a LoRA on the UNet's attention layers when
`unet_lora` asks for one (or the starting model folder has one; a departure from the paper, see
`emojidiff.models.lora`) and, when its spec makes it trainable (`tiny_conv` on the world), the
expression encoder. Everything else is frozen in one place
(`_freeze`) and left out of checkpoints: a checkpoint holds the trainable state, its EMA, the
optimizer and the stage's own state (`stage_state`), plus an `emojidiff` record (model spec and
adapter layer specs) from which `emojidiff export` writes a model folder without Lightning.

Validation logs how much each condition lowers the diffusion loss (`val/template_gain`,
`val/identity_gain`: the loss with the batch's templates or identities swapped within it minus the
loss with the right ones, same noise; ~0 while a branch ignores its input), generates the
held-out batches with the EMA weights (DDIM, `val_steps`), logs the
identity similarity of the output to the reference and its expression error against the template
(`val_identity_encoder`, by default the model's own identity encoder, and `val_expression_analyser`,
without which no expression error is logged; the configs give the *training* analysers, so model
selection never touches the evaluation analysers), and writes a panel (reference | template |
output | target) to TensorBoard and `<log_dir>/panels/`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from PIL import Image
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchmetrics import MeanMetric

from emojidiff.face.base import ExpressionAnalyser, IdentityEncoder
from emojidiff.images import to_tensor, to_uint8, to_unit
from emojidiff.losses import diffusion_loss, sample_timesteps
from emojidiff.models.adapter import EAdapter
from emojidiff.models.bundle import EmojiDiffModel, ModelSpec, save_model
from emojidiff.models.lora import add_unet_lora, has_lora, lora_modules
from emojidiff.models.lora import describe as describe_lora
from emojidiff.models.pipeline import EmojiDiffPipeline
from emojidiff.optim import LinearWarmup, adamw

log = logging.getLogger(__name__)

#: Checkpoint key of the record `emojidiff export` reads.
EXPORT_RECORD = "emojidiff"


#: Arguments of the training modules that are objects built by the config (the parts, the scorers,
#: the optimizer and schedule callables): left out of the hyperparameters.
PART_ARGUMENTS = [
    "model",
    "optimizer",
    "lr_scheduler",
    "val_identity_encoder",
    "val_expression_analyser",
    "expression_analyser",
    "loss_identity_encoder",
]


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf; the message names the term and the step."""


class AdapterTrainingModule(L.LightningModule):
    """Base of the training stages (subclasses implement `compute_losses`).

    Args:
        model: the parts: backbone (frozen), attached E-Adapter, identity encoder, expression
            encoder, and the `ModelSpec` the export writes (None: the parts train but are not
            exported). Configs: `emojidiff.models.bundle.FreshModel` (a fresh adapter, encoders by
            registry name) or `TrainedModel` (a model folder, e.g. stage 1's export, whose adapter,
            expression encoder and UNet LoRA keep training).
        optimizer: parameter groups (`parameter_groups`) -> optimizer (default `emojidiff.optim.adamw`:
            AdamW, lr 1e-4, weight decay 0.01).
        lr_scheduler: optimizer -> learning-rate schedule, stepped every optimizer step (default
            `emojidiff.optim.LinearWarmup` without warm-up: constant); None: none.
        unet_lora: UNetLoraConfig fields ({"rank": 8, ...}) of a LoRA on the UNet's attention layers,
            trained with the adapter (None: none, unless `model`'s UNet carries one, which then
            keeps training); `unet_lr` its learning rate (None: the optimizer's).
        id_source: "shard": the triplet's `id.npy` (written by the data job with its identity
            encoder); "encoder": embed `ref` with the model's identity encoder at every step.
        ema_decay: decay of the EMA of the trainable weights (None: no EMA; validation and
            export then use the live weights).
        gradient_checkpointing: the UNet's activation checkpointing (memory for compute).
        val_steps / val_guidance / val_panel_rows: validation sampling and panel size.
        val_identity_encoder: validation identity scorer (None: the model's identity encoder).
        val_expression_analyser: validation expression scorer (None: no `val/expression_error`).
        export_dir: where `on_fit_end` writes the EMA model folder (default `<log_dir>/model`).
        seed: seeds the per-step random draws and a new UNet LoRA's initialisation.
    """

    stage = "abstract"

    def __init__(
        self,
        model: EmojiDiffModel,
        optimizer: OptimizerCallable = adamw,
        lr_scheduler: LRSchedulerCallable | None = LinearWarmup,
        unet_lora: dict[str, Any] | None = None,
        unet_lr: float | None = None,
        id_source: str = "shard",
        ema_decay: float | None = 0.999,
        gradient_checkpointing: bool = False,
        val_steps: int = 20,
        val_guidance: float = 5.0,
        val_panel_rows: int = 8,
        val_identity_encoder: IdentityEncoder | None = None,
        val_expression_analyser: ExpressionAnalyser | None = None,
        export_dir: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if id_source not in ("shard", "encoder"):
            raise ValueError(f"id_source must be 'shard' or 'encoder', got {id_source!r}")
        # the parts are objects (and the optimizer / schedule callables): not hyperparameters
        self.save_hyperparameters(ignore=PART_ARGUMENTS)
        pipe = model.pipeline
        self.model_spec: ModelSpec | None = model.spec
        self.model_source, self.model_untrained = model.source, model.untrained
        self.backbone = pipe.backbone
        self.adapter: EAdapter = pipe.adapter
        self.expression_encoder = pipe.expression_encoder
        self.identity_encoder = pipe.identity_encoder
        self.make_optimizer, self.make_lr_scheduler = optimizer, lr_scheduler
        if unet_lora is not None:
            if has_lora(self.backbone.unet):
                raise ValueError(
                    f"model.init_args.unet_lora is set but the model ({model.source}) already carries a "
                    "UNet LoRA (it keeps training): leave unet_lora null"
                )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                add_unet_lora(self.backbone.unet, unet_lora)
        self.set_part("val_identity_encoder", val_identity_encoder, default=self.identity_encoder)
        self.val_expression_analyser = val_expression_analyser
        self._freeze()
        if gradient_checkpointing:
            self.adapter.enable_gradient_checkpointing(self.backbone.unet)
        self.ema = (
            None
            if ema_decay is None
            else AveragedModel(
                self.trainable_modules(), multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True
            ).requires_grad_(False)
        )
        self.val_id_sim = MeanMetric()
        self.val_expr_err = MeanMetric()
        self.val_template_gain = MeanMetric()
        self.val_identity_gain = MeanMetric()
        self.strict_loading = (
            False  # the frozen parts are not in checkpoints; on_load_checkpoint checks the rest
        )
        self._panel: dict[str, Tensor] | None = None
        self._swapped: dict[str, Tensor] | None = None
        self._gathered = False  # inside full_parameters

    # -- parts ---------------------------------------------------------------------------------

    def set_part(self, name: str, part: nn.Module | None, default: nn.Module) -> None:
        """`self.<name>` = `part`, or `default` when None: then the same network under a second name,
        kept as a plain attribute rather than a second registration (one name per weight, which
        FSDP's units and state dicts need; `default` is registered, so it moves and saves as itself)."""
        if part is None:
            object.__setattr__(self, name, default)
        else:
            setattr(self, name, part)

    def _freeze(self) -> None:
        """Frozen: backbone (UNet, VAE, text encoders), identity encoder, validation scorers.
        Trainable: the adapter; the expression encoder when its spec says so."""
        for m in (
            self.backbone,
            self.identity_encoder,
            self.val_identity_encoder,
            self.val_expression_analyser,
        ):
            if m is not None:
                m.requires_grad_(False)
        self.adapter.requires_grad_(True)
        self.expression_encoder.requires_grad_(bool(getattr(self.expression_encoder, "trainable", False)))
        lora_modules(self.backbone.unet).requires_grad_(True)

    def trainable_modules(self) -> nn.ModuleDict:
        """The modules with trainable weights: {"adapter": ..., "unet_lora": the LoRA's A/B layers (if
        any, the UNet's own modules), "expression_encoder": ... (if trainable)}."""
        parts = nn.ModuleDict({"adapter": self.adapter})
        if has_lora(self.backbone.unet):
            parts["unet_lora"] = lora_modules(self.backbone.unet)
        if getattr(self.expression_encoder, "trainable", False):
            parts["expression_encoder"] = self.expression_encoder
        return parts

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.trainable_modules().parameters() if p.requires_grad]

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's groups: everything trainable at the optimizer's learning rate, the LoRA in a
        group of its own at `unet_lr` (when set)."""
        parts = self.trainable_modules()
        lora = [p for p in parts["unet_lora"].parameters()] if "unet_lora" in parts else []
        lora_ids = {id(p) for p in lora}
        rest = [p for p in self.trainable_parameters() if id(p) not in lora_ids]
        groups: list[dict[str, Any]] = [{"params": rest}]
        if lora:
            unet_lr = self.hparams.unet_lr
            groups.append({"params": lora} if unet_lr is None else {"params": lora, "lr": unet_lr})
        return groups

    def train(self, mode: bool = True) -> AdapterTrainingModule:
        super().train(mode)
        self.backbone.train(False)  # frozen parts stay in eval mode (no dropout, fixed norms)
        for m in (self.identity_encoder, self.val_identity_encoder, self.val_expression_analyser, self.ema):
            if m is not None:
                m.train(False)
        return self

    @property
    def scheduler(self):
        return self.backbone.noise_scheduler

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.prediction_type)

    @property
    def alphas_cumprod(self) -> Tensor:
        return self.scheduler.alphas_cumprod

    # -- conditioning --------------------------------------------------------------------------

    def identity_embeddings(self, batch: Mapping[str, Any]) -> Tensor:
        """(B, D) identity embeddings of the references (from the shard or the encoder)."""
        if self.hparams.id_source == "shard":
            emb = batch["id_embed"].to(self.device, torch.float32)
            want = self.adapter.config.id_embed_dim
            if emb.shape[-1] != want:
                encoder = (
                    self.model_spec.identity_encoder["name"]
                    if self.model_spec is not None
                    else type(self.identity_encoder).__name__
                )
                raise ValueError(
                    f"the shards' id.npy embeddings have {emb.shape[-1]} dims but the adapter takes {want} "
                    f"(the model's identity encoder {encoder!r}); set "
                    "model.init_args.id_source=encoder or regenerate the data with the same identity encoder"
                )
            return emb
        return self.identity_encoder(to_unit(batch["ref"].to(self.device)))

    def identity_features(self, batch: Mapping[str, Any]) -> Tensor | None:
        """(B, L, F) the identity encoder's spatial features of the references, for an adapter that reads
        them (`EAdapterConfig.num_id_feature_tokens`); None otherwise."""
        if not self.adapter.uses_id_features:
            return None
        with torch.no_grad():
            return self.identity_encoder.token_features(to_unit(batch["ref"].to(self.device)))

    def text_states(self, prompts: list[str], drop: Tensor | None = None) -> dict[str, Any]:
        """encode_prompt of the prompts, "" where `drop` (the null text of classifier-free guidance)."""
        if drop is not None:
            prompts = ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]
        return self.backbone.encode_prompt(prompts)

    def condition(
        self, batch: Mapping[str, Any], dropout: bool = True
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        """(encoder_hidden_states (B, T + N + M, C), added_cond_kwargs) of a batch, with its CFG dropout flags."""
        drop = (lambda k: batch[k].to(self.device)) if dropout else (lambda k: None)
        id_embeds = self.identity_embeddings(batch)
        tmpl = to_unit(batch["tmpl"].to(self.device))
        feats = self.expression_encoder(tmpl, batch["tmpl_mask"].to(self.device))
        tokens = self.adapter.encode_conditions(
            id_embeds,
            feats,
            drop_id=drop("drop_id"),
            drop_expr=drop("drop_expr"),
            id_features=self.identity_features(batch),
        )
        text = self.text_states(list(batch["prompt"]), drop("drop_text"))
        ehs = self.adapter.build_encoder_hidden_states(text["encoder_hidden_states"], tokens)
        return ehs, text["added_cond_kwargs"]

    def step_generator(self, batch_idx: int) -> torch.Generator:
        """The random stream of one training micro-batch, seeded by (seed, global step, batch, rank).

        Noise, timesteps and latent samples come from it rather than the global RNG, so a run
        resumed from a checkpoint draws exactly what the uninterrupted run drew.
        """
        key = f"{self.hparams.seed}/{self.global_step}/{batch_idx}/{self.global_rank}".encode()
        return torch.Generator(device=self.device).manual_seed(zlib.crc32(key))

    def noised(
        self,
        batch: Mapping[str, Any],
        t_low: int = 0,
        t_high: int | None = None,
        generator: torch.Generator | None = None,
        sampling: str = "uniform",
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(latents x0, noise, timesteps (B,) in [t_low, t_high) drawn by `sampling` (losses.sample_timesteps),
        noisy x_t) of the batch's targets."""
        with torch.no_grad():
            latents = self.backbone.encode_images(batch["tgt"].to(self.device), generator=generator)
        t_high = self.scheduler.config.num_train_timesteps if t_high is None else t_high
        t = sample_timesteps(latents.shape[0], t_low, t_high, sampling, generator, self.device)
        noise = torch.randn(latents.shape, device=self.device, dtype=latents.dtype, generator=generator)
        return latents, noise, t, self.scheduler.add_noise(latents, noise, t)

    def diffusion_target(self, latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, t)
        raise ValueError(f"unsupported prediction type {self.prediction_type!r}")

    def unet(self, noisy: Tensor, t: Tensor, ehs: Tensor, added: dict[str, Tensor] | None) -> Tensor:
        return self.backbone.unet(
            noisy.to(self.backbone.dtype), t, encoder_hidden_states=ehs, added_cond_kwargs=added
        ).sample

    # -- training ------------------------------------------------------------------------------

    def compute_losses(self, batch: Mapping[str, Any], generator: torch.Generator) -> dict[str, Tensor]:
        """{term: (B,) or scalar weighted loss}; their sum is optimised. Subclasses implement it;
        every random draw comes from `generator` (see `step_generator`)."""
        raise NotImplementedError

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        terms = self.compute_losses(batch, self.step_generator(batch_idx))
        scalars = {name: v.mean() for name, v in terms.items()}
        for name, value in scalars.items():
            if not torch.isfinite(value):
                raise NonFiniteLossError(
                    f"{self.stage}: loss term {name!r} is {value.item()} at global step {self.global_step} "
                    f"(batch {batch_idx}, first key {batch['key'][0]!r}); lower the learning rate or check the data"
                )
        loss = torch.stack(list(scalars.values())).sum()
        b = batch["tgt"].shape[0]
        self.log_dict({f"train/{k}": v.detach() for k, v in scalars.items()}, batch_size=b)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=b)
        return loss

    def configure_optimizers(self):
        # only the trainable weights (adapter, a UNet LoRA, a trainable expression encoder); the rest is frozen
        optimizer = self.make_optimizer(self.parameter_groups())
        if self.make_lr_scheduler is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.make_lr_scheduler(optimizer), "interval": "step"},
        }

    def configure_gradient_clipping(
        self,
        optimizer: Any,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Under FSDP the norm is clipped by FSDP's `clip_grad_norm_` (over every rank's shards; Lightning's
        FSDP precision plugin refuses norm clipping); otherwise Lightning's own clipping."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = self.trainer.strategy.model
        if (
            isinstance(wrapped, FullyShardedDataParallel)
            and gradient_clip_val
            and gradient_clip_algorithm in (None, "norm")
        ):
            wrapped.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    @contextlib.contextmanager
    def full_parameters(self, writeback: bool) -> Iterator[None]:
        """Under FSDP, every parameter whole within the block (FSDP's `summon_full_params`, a collective:
        every rank must enter; `writeback` keeps changes made there); otherwise, and when already
        inside, nothing. Outside FSDP's forward the parameters are this rank's shards, so the EMA
        update, the EMA swap and the export run in here."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        strategy = getattr(self._trainer, "strategy", None)
        wrapped = getattr(strategy, "model", None)
        if not isinstance(wrapped, FullyShardedDataParallel) or self._gathered:
            yield
            return
        self._gathered = True
        try:
            with FullyShardedDataParallel.summon_full_params(wrapped, writeback=writeback):
                yield
        finally:
            self._gathered = False

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None and (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:
            with self.full_parameters(writeback=True):  # under FSDP a second all-gather per step
                self.ema.update_parameters(self.trainable_modules())

    # -- EMA swap for validation and export ----------------------------------------------------

    def _swap_in_ema(self) -> None:
        if self.ema is None or self._swapped is not None:
            return
        with self.full_parameters(writeback=True):
            live = self.trainable_modules()
            self._swapped = {k: v.detach().clone() for k, v in live.state_dict().items()}
            live.load_state_dict(self.ema.module.state_dict())

    def _swap_out_ema(self) -> None:
        if self._swapped is not None:
            with self.full_parameters(writeback=True):
                self.trainable_modules().load_state_dict(self._swapped)
            self._swapped = None

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Within the block the trainable modules hold the EMA weights (the live ones without EMA)."""
        swapped = self._swapped is None
        if swapped:
            self._swap_in_ema()
        try:
            yield
        finally:
            if swapped:
                self._swap_out_ema()

    # -- validation ----------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._swap_in_ema()
        self._panel = None

    def pipeline(self) -> EmojiDiffPipeline:
        return EmojiDiffPipeline(self.backbone, self.adapter, self.expression_encoder, self.identity_encoder)

    @torch.no_grad()
    def conditioning_gains(self, batch: Mapping[str, Any], batch_idx: int) -> tuple[Tensor, Tensor]:
        """How much each condition lowers the diffusion loss: (B,) loss with the templates (or the
        identities) rolled by half the batch minus the loss with the right ones, at the same noise
        and timesteps (half, not one: held-out shards list each person's images together). About 0
        while a branch ignores its input; it grows as the branch learns."""
        g = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)
        latents, noise, t, noisy = self.noised(batch, generator=g)
        target = self.diffusion_target(latents, noise, t)
        roll = torch.roll(torch.arange(batch["tgt"].shape[0]), batch["tgt"].shape[0] // 2)
        variants = {
            "right": batch,
            "tmpl": {**batch, "tmpl": batch["tmpl"][roll], "tmpl_mask": batch["tmpl_mask"][roll]},
            "id": {**batch, "id_embed": batch["id_embed"][roll], "ref": batch["ref"][roll]},
        }
        losses = {}
        for name, v in variants.items():
            ehs, added = self.condition(v, dropout=False)
            losses[name] = diffusion_loss(self.unet(noisy, t, ehs, added), target)
        return losses["tmpl"] - losses["right"], losses["id"] - losses["right"]

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        b, size = batch["tgt"].shape[0], batch["tgt"].shape[-1]
        if b > 1:
            tmpl_gain, id_gain = self.conditioning_gains(batch, batch_idx)
            self.val_template_gain.update(tmpl_gain)
            self.val_identity_gain.update(id_gain)
        was_training = self.expression_encoder.training
        self.expression_encoder.eval()
        try:
            out = self.pipeline()(
                to_unit(batch["tmpl"].to(self.device)),
                id_embeds=self.identity_embeddings(batch),
                id_features=self.identity_features(batch),
                expr_mask=batch["tmpl_mask"].to(self.device),
                prompt=list(batch["prompt"]),
                num_inference_steps=self.hparams.val_steps,
                guidance_scale=self.hparams.val_guidance,
                generator=torch.Generator("cpu").manual_seed(1000 + batch_idx),
                height=size,
                width=size,
            )
        finally:
            self.expression_encoder.train(was_training)
        images = to_tensor(out.images).to(self.device)
        ref, tmpl = to_unit(batch["ref"].to(self.device)), to_unit(batch["tmpl"].to(self.device))
        enc, ana = self.val_identity_encoder, self.val_expression_analyser
        self.val_id_sim.update(enc.similarity(enc(images), enc(ref)))
        if ana is not None:
            self.val_expr_err.update(ana.distance(ana(images), ana(tmpl)))
        if self._panel is None:
            n = min(b, self.hparams.val_panel_rows)
            self._panel = {
                "ref": ref[:n],
                "tmpl": tmpl[:n],
                "out": images[:n],
                "tgt": to_unit(batch["tgt"][:n].to(self.device)),
            }

    def on_validation_epoch_end(self) -> None:
        self.log("val/identity_similarity", self.val_id_sim.compute(), sync_dist=False)
        if self.val_expr_err.update_count:
            self.log("val/expression_error", self.val_expr_err.compute(), sync_dist=False)
        if self.val_template_gain.update_count:
            self.log("val/template_gain", self.val_template_gain.compute(), sync_dist=False)
            self.log("val/identity_gain", self.val_identity_gain.compute(), sync_dist=False)
        for metric in (self.val_id_sim, self.val_expr_err, self.val_template_gain, self.val_identity_gain):
            metric.reset()
        self._swap_out_ema()
        log_dir = (
            self.trainer.log_dir
        )  # on every rank: under DDP it is a collective (a broadcast from rank 0)
        if self._panel is not None and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self._write_panel(self._panel, log_dir)

    def _write_panel(self, panel: Mapping[str, Tensor], log_dir: str | None) -> None:
        """Rows: samples; columns: reference | template | output | target; the PNG goes to `<log_dir>/panels/`."""
        grid = torch.cat(
            [torch.cat(list(panel[k].cpu()), dim=1) for k in ("ref", "tmpl", "out", "tgt")], dim=2
        )
        experiment = getattr(self.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            experiment.add_image("val/panel (reference | template | output | target)", grid, self.global_step)
        if log_dir:
            folder = Path(log_dir) / "panels"
            folder.mkdir(parents=True, exist_ok=True)
            array = to_uint8(grid[None])[0]
            Image.fromarray(array).save(folder / f"step{self.global_step:07d}.png")

    # -- checkpoints and export ----------------------------------------------------------------

    def stage_state(self) -> dict[str, Any]:
        """Extra state a stage must resume exactly (JSON-able); see `load_stage_state`."""
        return {}

    def load_stage_state(self, state: Mapping[str, Any]) -> None:
        pass

    def export_record(self) -> dict[str, Any]:
        """What `emojidiff export` needs to write a model folder from a checkpoint (JSON-able; "model" is
        None for parts handed in without a spec)."""
        spec = None if self.model_spec is None else asdict(self.model_spec)
        return {
            "stage": self.stage,
            "model": spec,
            "adapter": {"config": asdict(self.adapter.config), "layers": self.adapter.layer_specs},
            "ema": self.ema is not None,
            "unet_lora": describe_lora(self.backbone.unet),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if self._kept(k)}
        checkpoint[EXPORT_RECORD] = json.loads(json.dumps(self.export_record()))
        checkpoint["stage_state"] = self.stage_state()

    def _kept(self, key: str) -> bool:
        """Whether a state_dict key is trainable state a checkpoint keeps (adapter, EMA, LoRA, encoder)."""
        keep = ["adapter.", "ema."]
        if "expression_encoder" in self.trainable_modules():
            keep.append("expression_encoder.")
        return key.startswith(tuple(keep)) or (key.startswith("backbone.unet.") and ".lora_" in key)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        want = [k for k in self.state_dict() if self._kept(k)]
        missing = [k for k in want if k not in checkpoint["state_dict"]]
        if missing:
            raise KeyError(
                f"the checkpoint lacks {len(missing)} trainable weights, e.g. {missing[:3]}: "
                f"it was not written by {type(self).__name__} with this adapter config"
            )
        self.load_stage_state(checkpoint.get("stage_state", {}))

    def export(self, folder: str | Path, use_ema: bool = True) -> Path:
        """Write the (EMA) weights as a model folder that `emojidiff generate` and the evaluation load."""
        spec = self.model_spec
        if spec is None:
            raise ValueError(
                f"the model ({self.model_source}) was handed in without a ModelSpec: its parts cannot be "
                "written as a model folder (build it with emojidiff.models.bundle.FreshModel or TrainedModel)"
            )
        if use_ema:
            self._swap_in_ema()
        try:
            return save_model(
                folder,
                backbone_path=spec.backbone,
                adapter=self.adapter,
                expression_encoder=self.expression_encoder,
                expression_encoder_spec=spec.expression_encoder,
                identity_encoder_spec=spec.identity_encoder,
                image_size=spec.image_size,
                default_prompt=spec.default_prompt,
                mask_from=spec.mask_from,
                unet=self.backbone.unet,
            )
        finally:
            self._swap_out_ema()

    def on_fit_end(self) -> None:
        log_dir = (
            self.trainer.log_dir
        )  # on every rank: under DDP it is a collective (a broadcast from rank 0)
        with self.full_parameters(writeback=False):  # under FSDP: every rank gathers, rank 0 writes
            if not self.trainer.is_global_zero:
                return
            if self.model_spec is None:
                log.warning(
                    "%s: the model was handed in without a ModelSpec: no model folder exported", self.stage
                )
                return
            folder = self.hparams.export_dir or (Path(log_dir or ".") / "model")
            path = self.export(folder)
        optimizers = [{"class": type(o).__name__, **o.defaults} for o in self.trainer.optimizers]
        record = {
            "stage": self.stage,
            "global_step": self.global_step,
            "epoch": self.current_epoch,
            "log_dir": log_dir,
            "model_source": self.model_source,
            "hparams": dict(self.hparams),
            "optimizers": optimizers,
            "weights": "ema" if self.ema else "live",
        }
        (Path(path) / "train_record.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        log.info(
            "%s: exported the %s weights to %s", self.stage, "EMA" if self.ema is not None else "live", path
        )
