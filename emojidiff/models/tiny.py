"""The embedded tiny backbone: SD1.5- and SDXL-shaped latent diffusion stacks in diffusers' classes.

Everything here is random-initialised and small enough to train on 2 CPU cores (`make base` trains
it on the synthetic face world; this module only builds the architecture and writes/reads it).

Shapes of the default tiny stack (64x64 RGB images):

- VAE: `AutoencoderKL`, (B, 3, 64, 64) in [-1, 1] -> latents (B, 8, 16, 16) (downsampling x4;
  8 channels rather than SD's 4 keep the small facial features through the latent space).
- UNet (sd15): `UNet2DConditionModel`, 3 levels (32, 64, 128) channels, cross-attention at
  16x16, 8x8 and the mid block, cross_attention_dim 64.
- UNet (sdxl): same levels, SDXL block order (no attention at the top level), `text_time`
  added conditioning, two transformer layers in the deepest level, cross_attention_dim 128 (the
  two text encoders' hidden states concatenated, as SDXL does).
- Text encoder: `CLIPTextModel` (hidden 64, 2 layers, 32 positions) with a `CLIPTokenizer` whose
  vocabulary the project builds from a word list (`build_vocabulary`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from tokenizers import Tokenizer
from tokenizers.models import BPE
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from emojidiff.models.attention import EmojiDiffAttnProcessor
from emojidiff.models.backbone import Backbone
from emojidiff.world.prompts import WORLD_VOCABULARY

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_TEXT_LENGTH = 32
LATENT_CHANNELS = 8

#: Words every tiny tokenizer knows as single tokens; callers add their world's own words.
DEFAULT_VOCABULARY: tuple[str, ...] = (
    "a",
    "an",
    "the",
    "of",
    "with",
    "and",
    "in",
    "on",
    "photo",
    "portrait",
    "face",
    "person",
    "man",
    "woman",
    "boy",
    "girl",
    "young",
    "old",
    "smiling",
    "smile",
    "laughing",
    "sad",
    "angry",
    "surprised",
    "neutral",
    "happy",
    "disgusted",
    "fearful",
    "open",
    "closed",
    "mouth",
    "eyes",
    "eyebrows",
    "raised",
    "frown",
    "wink",
    "looking",
    "left",
    "right",
    "up",
    "down",
    "hair",
    "short",
    "long",
    "dark",
    "light",
    "skin",
    "background",
    "glasses",
    "beard",
)


# ---------------------------------------------------------------------------------------------
# Tokenizer: a CLIP BPE vocabulary built from a word list
# ---------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table (256 entries)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _bpe_tokens(vocab: dict[str, int], merges: list[tuple[str, str]], word: str) -> list[str]:
    """How the `tokenizers` BPE model (as CLIPTokenizer configures it) splits one pre-token."""
    model = BPE(
        vocab=vocab,
        merges=merges,
        end_of_word_suffix="</w>",
        continuing_subword_prefix="",
        unk_token=EOS_TOKEN,
    )
    return [t.value for t in Tokenizer(model).model.tokenize(word)]


def _normalise_word(word: str) -> str:
    w = word.strip().lower()
    if not w or not w.isalpha():
        raise ValueError(f"vocabulary words must be single alphabetic words, got {word!r}")
    return "".join(_bytes_to_unicode()[b] for b in w.encode("utf-8"))


def build_vocabulary(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Build a CLIP BPE `(vocab, merges)` in which every word of `words` is ONE token `word</w>`.

    The vocabulary holds the 256 byte-level characters, each also with the `</w>` end-of-word
    suffix (so any text still tokenizes, character by character), the intermediate pieces the
    merges produce, every `word</w>`, and the special tokens `<|startoftext|>`/`<|endoftext|>` last
    (as in CLIP, so the text model's EOS pooling by argmax still works).

    Merges are added word by word: the word is run through the BPE built so far and the pieces
    it ends in are joined left to right by new merges ranked after all existing ones. A later,
    lower-priority merge never fires inside a word that already reduces to one token, so earlier
    words stay single tokens; each word is re-checked until it is one token.
    """
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    seen_merges: set[tuple[str, str]] = set()
    for word in dict.fromkeys(_normalise_word(w) for w in words):
        for _ in range(len(word) + 1):
            pieces = _bpe_tokens(vocab, merges, word)
            if len(pieces) == 1:
                break
            left = pieces[0]
            for right in pieces[1:]:
                if (left, right) not in seen_merges:
                    seen_merges.add((left, right))
                    merges.append((left, right))
                left = left + right
                vocab.setdefault(left, len(vocab))
        else:  # pragma: no cover - would mean the BPE rules above are wrong
            raise RuntimeError(f"could not make {word!r} a single token")
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return vocab, merges


def write_tokenizer_files(words: Iterable[str], folder: str | Path) -> Path:
    """Write `vocab.json` and `merges.txt` (CLIP format) for `words` into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocabulary(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    return folder


def build_tokenizer(
    words: Iterable[str] = DEFAULT_VOCABULARY, max_length: int = MAX_TEXT_LENGTH
) -> CLIPTokenizer:
    """A `CLIPTokenizer` over the project-built vocabulary of `words` (plus all single characters)."""
    vocab, merges = build_vocabulary(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


# ---------------------------------------------------------------------------------------------
# Model configs
# ---------------------------------------------------------------------------------------------


def tiny_vae_config() -> dict[str, Any]:
    """AutoencoderKL: 64x64x3 <-> 16x16x4 (three levels, x4 downsampling), ~1.5M parameters."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=64,
        scaling_factor=1.0,  # `make base` re-estimates it from the latents' std (as SD did)
    )


def tiny_text_config(
    vocab_size: int, eos_token_id: int, bos_token_id: int, hidden_size: int = 64, projection_dim: int = 64
) -> CLIPTextConfig:
    """CLIPTextModel: hidden 64, 2 layers, 2 heads, 32 positions."""
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TEXT_LENGTH,
        projection_dim=projection_dim,
        hidden_act="quick_gelu",
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )


def tiny_unet_config(
    kind: str = "sd15", cross_attention_dim: int | None = None, pooled_dim: int = 64
) -> dict[str, Any]:
    """UNet2DConditionModel configs on 16x16x4 latents.

    sd15: down (CrossAttn, CrossAttn, Down), up (Up, CrossAttn, CrossAttn), cross_attention_dim 64.
    sdxl: down (Down, CrossAttn, CrossAttn), up (CrossAttn, CrossAttn, Up), transformer layers
    (1, 1, 2), linear projections, `addition_embed_type="text_time"` with the projection input
    dim `6 * addition_time_embed_dim + pooled_dim` (six time ids + the pooled text embedding).
    """
    common = dict(
        sample_size=16,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        norm_num_groups=16,
    )
    if kind == "sd15":
        return dict(
            common,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_attention_dim or 64,
            attention_head_dim=4,  # as in SD1.5's config this is the number of heads
        )
    if kind == "sdxl":
        time_dim = 8
        return dict(
            common,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2),
            cross_attention_dim=cross_attention_dim or 128,
            attention_head_dim=(2, 4, 8),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + pooled_dim,
        )
    raise ValueError(f"unknown backbone kind {kind!r}; expected 'sd15' or 'sdxl'")


def tiny_scheduler_config() -> dict[str, Any]:
    """DDPMScheduler with SD's scaled-linear betas and epsilon prediction."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


# ---------------------------------------------------------------------------------------------
# Construction and saving
# ---------------------------------------------------------------------------------------------


def build_tiny_backbone(
    kind: str = "sd15", vocabulary: Sequence[str] = DEFAULT_VOCABULARY, seed: int = 0, attention: str = "sdpa"
) -> Backbone:
    """A randomly initialised tiny backbone (frozen, eval mode), reproducible from `seed`.

    `kind="sd15"`: one CLIPTextModel (hidden 64). `kind="sdxl"`: a CLIPTextModel (hidden 64) and a
    CLIPTextModelWithProjection (hidden 64, projection 64) whose penultimate hidden states are
    concatenated to 128 channels; the second one's projected pooled output feeds `text_time`.
    """
    if kind not in ("sd15", "sdxl"):
        raise ValueError(f"unknown backbone kind {kind!r}; expected 'sd15' or 'sdxl'")
    tokenizer = build_tokenizer(vocabulary)
    vocab_size = len(tokenizer)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**tiny_vae_config())
        text_encoder = CLIPTextModel(tiny_text_config(vocab_size, **ids))
        text_encoder_2 = tokenizer_2 = None
        if kind == "sdxl":
            text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(vocab_size, **ids))
            tokenizer_2 = build_tokenizer(vocabulary)
            cross_dim = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
            unet = UNet2DConditionModel(
                **tiny_unet_config("sdxl", cross_dim, pooled_dim=text_encoder_2.config.projection_dim)
            )
        else:
            unet = UNet2DConditionModel(**tiny_unet_config("sd15", text_encoder.config.hidden_size))
    backbone = Backbone(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=DDPMScheduler(**tiny_scheduler_config()),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        kind=kind,
    )
    backbone.freeze()
    backbone.set_attention(attention)
    return backbone


def build_world_backbone(kind: str = "sd15", seed: int = 0, vae_from: str | Path | None = None) -> Backbone:
    """The tiny backbone that `make base` pretrains: `build_tiny_backbone(kind, seed=seed)` with a tokenizer
    that knows the world's caption words (`emojidiff.world.prompts.WORLD_VOCABULARY`) and, with
    `vae_from`, the trained frozen VAE of that backbone folder (`load_vae`) in place of the random one."""

    vocabulary = list(dict.fromkeys([*DEFAULT_VOCABULARY, *WORLD_VOCABULARY]))
    backbone = build_tiny_backbone(kind, vocabulary=vocabulary, seed=seed)
    if vae_from is not None:
        backbone.vae = load_vae(vae_from)
    return backbone


def load_vae(folder: str | Path, key: str = "vae_from") -> AutoencoderKL:
    """The frozen AutoencoderKL (eval mode) in `folder`/vae, a backbone folder as `save_backbone` writes it;
    `key` names the config entry the folder came from (in the error when there is none)."""
    folder = Path(folder)
    if not (folder / "vae" / "config.json").is_file():
        raise FileNotFoundError(
            f"{key} {folder}: no vae/config.json there (expected a backbone folder "
            "written by `make base`, e.g. its VAE stage `configs/base/vae.yaml`)"
        )
    vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True)
    return vae.eval().requires_grad_(False)


def save_backbone(backbone: Backbone, folder: str | Path) -> Path:
    """Write `backbone` in the standard diffusers layout (safetensors) so `Backbone.from_folder` reads it.

    Layout: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/ (and for SDXL
    text_encoder_2/, tokenizer_2/). Refuses a UNet with an E-Adapter attached (its weights would
    leak into unet/); call `adapter.detach(unet)` first.
    """

    if any(isinstance(p, EmojiDiffAttnProcessor) for p in backbone.unet.attn_processors.values()):
        raise ValueError(
            "an E-Adapter is attached to this UNet; call adapter.detach(unet) before save_backbone"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backbone.unet.save_pretrained(folder / "unet", safe_serialization=True)
    backbone.vae.save_pretrained(folder / "vae", safe_serialization=True)
    backbone.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    backbone.tokenizer.save_pretrained(folder / "tokenizer")
    backbone.noise_scheduler.save_pretrained(folder / "scheduler")
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLPipeline" if backbone.kind == "sdxl" else "StableDiffusionPipeline",
        "_diffusers_version": _diffusers_version(),
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", type(backbone.noise_scheduler).__name__],
    }
    if backbone.kind == "sdxl":
        backbone.text_encoder_2.save_pretrained(folder / "text_encoder_2", safe_serialization=True)
        backbone.tokenizer_2.save_pretrained(folder / "tokenizer_2")
        index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
        index["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
    else:
        index.update(
            safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False
        )
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def _diffusers_version() -> str:

    return diffusers.__version__
