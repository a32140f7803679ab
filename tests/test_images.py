"""The pixel conversion set of emojidiff.images against numpy by hand, bit for bit."""

import numpy as np
import pytest
import torch
from PIL import Image

from emojidiff.face.base import images_to_tensor, tensor_to_images
from emojidiff.images import to_signed, to_tensor, to_uint8, to_unit

ALL_VALUES = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)  # (1, 16, 16, 3)


def near_rounding_edges() -> torch.Tensor:
    """float32 (1, 3, N, 1) in and just outside [-1, 1], crowded around every uint8 rounding edge."""
    edges = (torch.arange(-1, 257, dtype=torch.float64) + 0.5) / 127.5 - 1
    y = (edges[:, None] + torch.arange(-300, 301, dtype=torch.float64) * 2.0**-25).flatten().float()
    y = torch.cat([y, torch.rand(30_000, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1])
    return y[: len(y) // 3 * 3].reshape(1, 3, -1, 1)


def test_to_tensor_is_x_over_255_for_every_uint8_value():
    by_hand = ALL_VALUES.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255)
    for images in (ALL_VALUES, list(ALL_VALUES), torch.from_numpy(ALL_VALUES)):
        x = to_tensor(images)
        assert x.dtype == torch.float32 and x.shape == (1, 3, 16, 16)
        np.testing.assert_array_equal(x.numpy(), by_hand)
    assert x[0, :, 0, 0].tolist() == [0.0] * 3 and x[0, :, -1, -1].tolist() == [1.0] * 3
    np.testing.assert_array_equal(to_tensor(ALL_VALUES, device="cpu").numpy(), by_hand)


def test_uint8_float_uint8_round_trips_exactly():
    back = to_uint8(to_tensor(ALL_VALUES))
    assert back.dtype == np.uint8 and back.flags.c_contiguous
    np.testing.assert_array_equal(back, ALL_VALUES)
    # through [-1, 1] too: the quantisation absorbs the one-ulp error of to_signed -> to_unit
    np.testing.assert_array_equal(to_uint8(to_unit(to_signed(to_tensor(ALL_VALUES)))), ALL_VALUES)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8))
    assert Image.fromarray(to_uint8(to_tensor([np.asarray(photo)]))[0]).tobytes() == photo.tobytes()


def test_to_uint8_clamps_and_rounds_half_to_even():
    y = to_unit(near_rounding_edges())
    by_hand = np.rint(np.clip(y.numpy(), 0, 1) * np.float32(255)).astype(np.uint8).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(to_uint8(y), by_hand)
    np.testing.assert_array_equal(to_uint8(y.double()), by_hand)  # computed in float32 whatever comes in
    ends = to_uint8(torch.tensor([-0.5, 0.5 / 255, 1.5 / 255, 1.5]).view(1, 1, 4, 1).expand(1, 3, 4, 1))
    assert ends[0, :, 0, 0].tolist() == [0, 0, 2, 255]  # clamped; 0.5 -> 0 and 1.5 -> 2 (half to even)


def test_to_unit_and_to_signed_map_the_ranges_and_invert_each_other():
    assert to_signed(torch.tensor([0.0, 0.5, 1.0])).tolist() == [-1.0, 0.0, 1.0]
    assert to_unit(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0.0, 0.5, 1.0]
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(to_unit(to_signed(x)), x, atol=1e-7, rtol=0)
    torch.testing.assert_close(to_signed(to_unit(to_signed(x))), to_signed(x), atol=2e-7, rtol=0)
    assert to_unit(x.half()).dtype == torch.float16 and to_signed(x.double()).dtype == torch.float64
    x.requires_grad_(True)
    to_unit(to_signed(x)).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_the_compositions_equal_the_127_5_forms_they_replaced():
    """uint8 -> [-1, 1] was x / 127.5 - 1 and [-1, 1] -> uint8 was ((y + 1) * 127.5).round().clamp(0, 255):
    the same bits as to_signed(to_tensor(x)) and to_uint8(to_unit(y)) (scaling by 2 commutes with rounding)."""
    u = torch.from_numpy(ALL_VALUES)
    old = u.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    assert torch.equal(to_signed(to_tensor(u)).view(torch.int32), old.view(torch.int32))
    y = near_rounding_edges()
    old_u8 = ((y.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(to_uint8(to_unit(y)), old_u8)
    y16 = y.half()
    old_u8 = ((y16.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(to_uint8(to_unit(y16.float())), old_u8)


def test_bad_inputs_are_named():
    with pytest.raises(TypeError, match="uint8"):
        to_tensor(ALL_VALUES.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        to_tensor(ALL_VALUES[0])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        to_uint8(torch.zeros(1, 16, 16, 3))


def test_face_wrappers_are_the_conversions_with_their_extras():
    grey = ALL_VALUES[0, :, :, 0]
    np.testing.assert_array_equal(images_to_tensor([grey]).numpy(), to_tensor(ALL_VALUES).numpy())
    images = tensor_to_images(to_tensor(ALL_VALUES))
    assert isinstance(images, list) and len(images) == 1 and images[0].flags.c_contiguous
    np.testing.assert_array_equal(images[0], ALL_VALUES[0])
