"""The embedded tiny backbone: project-built tokenizer, configs, shapes, seeding."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTokenizer

from emojidiff.models.tiny import (
    DEFAULT_VOCABULARY,
    EOS_TOKEN,
    build_tiny_backbone,
    build_tokenizer,
    build_vocabulary,
    write_tokenizer_files,
)

# Overlapping prefixes/suffixes that a naive "chain of merges per word" gets wrong.
TRICKY = ["a", "ab", "abab", "ababc", "bcd", "abcx", "bc", "aaa", "aa", "smile", "smiles", "mile", "x"]


def _word_ids(tok: CLIPTokenizer, word: str) -> list[int]:
    ids = tok(word).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    return ids[1:-1]


@pytest.mark.parametrize("words", [DEFAULT_VOCABULARY, TRICKY], ids=["default", "tricky"])
def test_every_vocabulary_word_is_one_token(words):
    tok = build_tokenizer(words)
    for word in words:
        ids = _word_ids(tok, word)
        assert len(ids) == 1, (word, tok.convert_ids_to_tokens(ids))
        assert tok.convert_ids_to_tokens(ids) == [word + "</w>"]


def test_unknown_words_still_tokenize_without_unk():
    tok = build_tokenizer(["smile", "face"])
    ids = _word_ids(tok, "zebra")
    assert len(ids) > 1
    assert tok.convert_tokens_to_ids(EOS_TOKEN) not in ids  # eos doubles as unk: never emitted inside
    assert tok.decode(ids) == "zebra"
    # a sentence mixing known and unknown words, upper case and punctuation
    sentence = _word_ids(tok, "Smile, zebra face!")
    assert (
        tok.convert_tokens_to_ids("smile</w>") in sentence
        and tok.convert_tokens_to_ids("face</w>") in sentence
    )


def test_vocabulary_layout_and_files_round_trip(tmp_path):
    vocab, merges = build_vocabulary(["smile", "face"])
    assert list(vocab)[-2:] == ["<|startoftext|>", EOS_TOKEN]  # specials last, as in CLIP
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert all(a + b in vocab for a, b in merges)
    write_tokenizer_files(["smile", "face"], tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    built = build_tokenizer(["smile", "face"])
    text = "a smile on the face of xyz"
    assert loaded(text).input_ids == built(text).input_ids
    with pytest.raises(ValueError, match="single alphabetic"):
        build_vocabulary(["two words"])


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_tiny_backbone_sizes_and_shapes(kind):
    bb = build_tiny_backbone(kind)
    n = {
        name: sum(p.numel() for p in getattr(bb, name).parameters())
        for name in ("unet", "vae", "text_encoder")
    }
    assert 0.5e6 < n["vae"] < 3e6
    assert 2e6 < n["unet"] < 6e6
    assert n["text_encoder"] < 0.5e6
    assert bb.vae_scale_factor == 4 and bb.default_image_size == 64
    lat = bb.encode_images(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert lat.shape == (2, 8, 16, 16)
    assert bb.decode_latents(lat).shape == (2, 3, 64, 64)
    assert all(not p.requires_grad for p in bb.parameters())
    cfg = bb.unet.config
    if kind == "sdxl":
        assert cfg.addition_embed_type == "text_time"
        assert (
            cfg.cross_attention_dim
            == bb.text_encoder.config.hidden_size + bb.text_encoder_2.config.hidden_size
        )
        assert cfg.projection_class_embeddings_input_dim == 6 * cfg.addition_time_embed_dim + (
            bb.text_encoder_2.config.projection_dim
        )
        assert bb.unet.add_embedding.linear_1.in_features == cfg.projection_class_embeddings_input_dim
    else:
        assert cfg.addition_embed_type is None
        assert cfg.cross_attention_dim == bb.text_encoder.config.hidden_size


def test_seed_fixes_weights():
    a, b, c = build_tiny_backbone(seed=0), build_tiny_backbone(seed=0), build_tiny_backbone(seed=1)
    wa, wb, wc = (m.unet.conv_in.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)
    # building does not disturb the global RNG
    torch.manual_seed(5)
    x = torch.rand(1)
    torch.manual_seed(5)
    build_tiny_backbone(seed=3)
    assert torch.equal(torch.rand(1), x)


def test_unknown_kind():
    with pytest.raises(ValueError, match="sd15"):
        build_tiny_backbone("sd3")
