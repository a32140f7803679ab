"""The browser page (`emojidiff app`, Gradio): one person wearing another picture's expression.

Inputs: the identity (a photo upload, or a world identity by number), the expression template (an
upload, the webcam, or a world preset worn by another world person), prompt, style, the identity
and expression scales, guidance, seed, steps and the model (the packaged one, or a model folder).
The page shows the output beside both inputs, as the model saw them, with the output's identity
similarity to the reference and its expression error against the template, scored by analysers
the model was not trained with (the world's evaluation pair for world models, dlib's face
descriptor and 68-landmark expression for photo models).

Expected user errors (a photo without a face, a file that is not an image, a model folder missing
a file) come back as one message in the page (`gr.Error`), never a stack trace. A face is looked for
by the model's own identity encoder: a photo model's (ArcFace, dlib) detects and aligns one; the
world's encoders read whole portraits, so a world model takes any upload as a portrait.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from emojidiff.choices import STYLES
from emojidiff.errors import FaceNotFoundError, MissingWeightsError
from emojidiff.face.analyse import describe_expressions, embed_identities
from emojidiff.face.masks import template_mask
from emojidiff.images import InputImageError, load_image, square, to_tensor
from emojidiff.models.bundle import (
    EmojiDiffModel,
    build_expression_analyser,
    build_identity_encoder,
    load_model,
)
from emojidiff.world import Expression, Identity, render_batch
from emojidiff.world.expression import PRESETS
from emojidiff.world.prompts import portrait_prompt

PACKAGED_MODEL = "emojidiff:emojidiff-world"
#: the world person who wears a preset template (apart from the identities a user picks by number)
PRESET_WEARER = 4_000_017
USER_ERRORS = (FaceNotFoundError, InputImageError, MissingWeightsError, UnidentifiedImageError, ValueError)


@dataclass
class Generation:
    """One request's result: the images as the model saw them and the output's scores."""

    reference: np.ndarray
    template: np.ndarray
    output: np.ndarray
    identity_similarity: float
    expression_error: float
    seconds: float


def _is_world_model(model: EmojiDiffModel) -> bool:
    spec = model.spec.identity_encoder if model.spec is not None else {}
    name = spec if isinstance(spec, str) else spec.get("name", "")
    return str(name).startswith("world")


class PortraitApp:
    """Models loaded on first use (by name), page inputs -> one scored generation. Thread-safe: one
    generation at a time (a CPU has no room for two)."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._lock = threading.Lock()

    @functools.lru_cache(maxsize=2)  # noqa: B019 (one app per process; the cache is the point)
    def model(self, name: str) -> EmojiDiffModel:
        return load_model(name.strip(), device=self.device, key="model")

    @functools.lru_cache(maxsize=2)  # noqa: B019
    def scorers(self, world: bool) -> tuple[Any, Any]:
        """(identity encoder, expression analyser) the page scores with."""
        if world:
            return build_identity_encoder("world-id-eval"), build_expression_analyser("world-expr-eval")
        return build_identity_encoder("dlib"), build_expression_analyser("dlib-lms")

    def identity_image(
        self, upload: str | None, world_identity: float | None, style: str, size: int
    ) -> np.ndarray:
        """The reference at the model's size: the upload (centre-cropped), else world identity N, neutral."""
        if upload:
            return load_image(upload, "identity photo", size)
        if world_identity is None:
            raise ValueError("give an identity: upload a photo or pick a world identity number")
        person = Identity.sample(int(world_identity))
        return (
            render_batch(
                [person], [Expression.preset("neutral")], style, size=size, seeds=[int(world_identity)]
            )
            .images[0]
            .numpy()
        )

    def template_image(
        self, upload: str | None, webcam: np.ndarray | None, preset: str | None, style: str, size: int
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """(template at the model's size, the full-resolution image, its name): upload, else the
        webcam frame, else the preset worn by another world person."""
        if upload:
            return (
                load_image(upload, "expression template", size),
                load_image(upload, "expression template"),
                Path(upload).name,
            )
        if webcam is not None:
            frame = square(_pil(webcam), None)
            return np.asarray(square(frame, size)), np.asarray(frame), "webcam frame"
        if not preset:
            raise ValueError("give an expression: upload a template, use the webcam or pick a preset")
        out = render_batch(
            [Identity.sample(PRESET_WEARER)],
            [Expression.preset(preset)],
            style,
            size=size,
            seeds=[PRESET_WEARER],
        )
        image = out.images[0].numpy()
        return image, image, f"preset {preset}"

    def generate(
        self,
        model_name: str,
        reference: np.ndarray,
        template: np.ndarray,
        template_full: np.ndarray,
        template_name: str,
        prompt: str,
        id_scale: float,
        expr_scale: float,
        guidance: float,
        seed: int,
        steps: int,
        progress: Callable[[int, int], None] | None = None,
    ) -> Generation:
        with self._lock:
            t0 = time.perf_counter()
            model = self.model(model_name)
            pipe, size = model.pipeline, model.image_size
            id_embeds = embed_identities(pipe.identity_encoder, [reference], ["identity photo"])
            mode = model.spec.mask_from if model.spec is not None else "none"
            mask = template_mask(template_full, mode, size, template_name) if mode != "none" else None
            result = pipe(
                to_tensor(template[None]),
                id_embeds=id_embeds,
                id_image=to_tensor(reference[None]) if pipe.adapter.uses_id_features else None,
                expr_mask=None if mask is None else torch.from_numpy(mask)[None, None].to(pipe.device),
                prompt=prompt,
                guidance_scale=float(guidance),
                num_inference_steps=int(steps),
                seed=int(seed),
                id_scale=float(id_scale),
                expr_scale=float(expr_scale),
                step_callback=progress,
            )
            output = result.images[0]
            id_eval, expr_eval = self.scorers(_is_world_model(model))
            names = ["output", "identity photo", "expression template"]
            emb = embed_identities(id_eval, [output, reference], names[:2], on_missing="nan")
            desc = describe_expressions(expr_eval, [output, template], [names[0], names[2]])
            return Generation(
                reference,
                template,
                output,
                float(id_eval.similarity(emb[:1], emb[1:])[0]),
                float(expr_eval.distance(desc[:1], desc[1:])[0]),
                time.perf_counter() - t0,
            )


def _pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.asarray(array, dtype=np.uint8)).convert("RGB")


def scores_markdown(g: Generation) -> str:
    return (
        f"**identity similarity** {g.identity_similarity:.3f} (to the reference; higher is better)  \n"
        f"**expression error** {g.expression_error:.3f} (against the template; lower is better)  \n"
        f"{g.seconds:.1f} s"
    )


def build_page(app: PortraitApp, models: Sequence[str]) -> gr.Blocks:
    """The page: inputs on the left, the result (reference | template | output) and scores on the right."""
    with gr.Blocks(title="EmojiDiff") as page:
        gr.Markdown(
            "# EmojiDiff\nOne person wearing another picture's facial expression. Identity: upload a photo or "
            "pick a world person; expression: upload a template, use the webcam or pick a preset."
        )
        with gr.Row():
            with gr.Column():
                with gr.Tabs():
                    with gr.Tab("identity: photo"):
                        id_upload = gr.File(
                            label="identity photo", file_types=["image"], elem_id="identity-upload"
                        )
                    with gr.Tab("identity: world person"):
                        id_world = gr.Number(label="world identity number", value=4_000_001, precision=0)
                with gr.Tabs():
                    with gr.Tab("expression: upload"):
                        expr_upload = gr.File(
                            label="expression template", file_types=["image"], elem_id="template-upload"
                        )
                    with gr.Tab("expression: webcam"):
                        expr_webcam = gr.Image(label="webcam", sources=["webcam"], type="numpy")
                    with gr.Tab("expression: world preset"):
                        expr_preset = gr.Dropdown(label="world preset", choices=list(PRESETS), value="happy")
                prompt = gr.Textbox(label="prompt (empty: the style's portrait prompt)", value="")
                style = gr.Dropdown(label="style", choices=list(STYLES), value=STYLES[0])
                with gr.Row():
                    id_scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="identity scale")
                    expr_scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="expression scale")
                with gr.Row():
                    guidance = gr.Slider(1.0, 10.0, value=5.0, step=0.5, label="guidance")
                    steps = gr.Slider(2, 50, value=30, step=1, label="steps")
                    seed = gr.Number(label="seed", value=0, precision=0)
                model = gr.Dropdown(
                    label="model (packaged name or model folder)",
                    choices=list(models),
                    value=models[0],
                    allow_custom_value=True,
                )
                go = gr.Button("generate", variant="primary", elem_id="generate")
            with gr.Column():
                with gr.Row():
                    shown_ref = gr.Image(
                        label="identity reference", interactive=False, format="png", height=200
                    )
                    shown_tmpl = gr.Image(
                        label="expression template", interactive=False, format="png", height=200
                    )
                output = gr.Image(
                    label="output", interactive=False, elem_id="output", format="png", height=320
                )
                scores = gr.Markdown(elem_id="scores")

        def run(
            id_file,
            world_id,
            expr_file,
            webcam,
            preset,
            text,
            style_name,
            s_id,
            s_expr,
            g,
            n_steps,
            s,
            name,
            progress=gr.Progress(),
        ):
            try:
                size = app.model(name).image_size
                reference = app.identity_image(id_file, world_id, style_name, size)
                template, full, tmpl_name = app.template_image(expr_file, webcam, preset, style_name, size)
                result = app.generate(
                    name,
                    reference,
                    template,
                    full,
                    tmpl_name,
                    text or portrait_prompt(style_name),
                    s_id,
                    s_expr,
                    g,
                    s,
                    n_steps,
                    progress=lambda i, n: progress((i, n), desc="sampling"),
                )
            except USER_ERRORS as err:
                raise gr.Error(str(err), print_exception=False) from None
            return result.reference, result.template, result.output, scores_markdown(result)

        go.click(
            run,
            [
                id_upload,
                id_world,
                expr_upload,
                expr_webcam,
                expr_preset,
                prompt,
                style,
                id_scale,
                expr_scale,
                guidance,
                steps,
                seed,
                model,
            ],
            [shown_ref, shown_tmpl, output, scores],
            api_name="generate",
        )
    return page
