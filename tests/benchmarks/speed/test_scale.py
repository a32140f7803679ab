"""The scale benchmark's measuring parts and the GPU check's CPU dry run."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.speed import gpu_check
from benchmarks.speed.scale import FlopCount, StepOptions, count_flops


def test_the_flop_count_of_a_linear_training_step_is_six_b_i_o():
    # forward 2*B*I*O, backward 2*B*I*O for the input gradient and 2*B*I*O for the weight gradient
    b, i, o = 8, 64, 32
    layer = torch.nn.Linear(i, o, bias=False)
    x = torch.randn(b, i, requires_grad=True)

    def step(batch):
        layer(batch["x"]).square().sum().backward()

    assert count_flops(step, {"x": x}) == 6 * b * i * o


def test_forward_flops_go_to_the_network_that_ran_them_and_the_backward_apart():
    b, i, h, o = 4, 16, 32, 8
    first, second = torch.nn.Linear(i, h, bias=False), torch.nn.Linear(h, o, bias=False)
    x = torch.randn(b, i)
    with FlopCount({"first": first, "second": second}) as counter:
        second(first(x)).sum().backward()
    # forward 2*B*in*out per layer; backward: weight gradients of both, the input gradient of the second
    assert counter.by_part == {
        "first": 2 * b * i * h,
        "second": 2 * b * h * o,
        "backward and losses": 2 * b * i * h + 2 * 2 * b * h * o,
    }
    assert counter.total == sum(counter.by_part.values())


def test_the_flop_count_of_attention_and_convolution_matches_the_formulas():
    b, h, n, d = 2, 4, 16, 8
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    conv = torch.nn.Conv2d(3, 5, 3, padding=1, bias=False)
    image = torch.randn(1, 3, 10, 10)

    def forward(batch):
        with torch.no_grad():
            torch.nn.functional.scaled_dot_product_attention(*batch["qkv"])
            conv(batch["image"])

    attention = 2 * (2 * b * h * n * n * d)  # QK^T and (softmax)V
    convolution = 2 * 1 * 5 * 10 * 10 * 3 * 3 * 3  # 2 * B * C_out * H * W * C_in * k * k
    assert count_flops(forward, {"qkv": (q, k, v), "image": image}) == attention + convolution


def test_step_options_refuse_what_cannot_run():
    with pytest.raises(ValueError, match="frozen_bf16 needs precision bf16-mixed"):
        StepOptions(precision="32-true", frozen_bf16=True)
    with pytest.raises(ValueError, match="attention must be sdpa or eager"):
        StepOptions(attention="flash")


@pytest.mark.slow
def test_the_gpu_check_dry_run_measures_every_part_and_writes_its_record(tmp_path):
    """The whole GPU check on the CPU with narrow networks: every part runs (none skipped, none failed),
    each training variant's loss is finite and the page shows each part."""
    record = gpu_check.run(gpu_check.GpuCheckOptions(dry_run=True, budget_s=1200, out_dir=str(tmp_path)))
    on_disk = json.loads((tmp_path / "scale_dry_run.json").read_text())
    assert on_disk["parts"].keys() == record["parts"].keys()
    expected = {
        "matmul_peak",
        "sd15_stage1",
        "sd15_ica",
        "sdxl_stage1",
        "loader",
        "tiny_stage1",
        "evaluation",
        "sd15_options",
    }
    assert set(record["parts"]) == expected
    for name, part in record["parts"].items():
        assert "error" not in part and "skipped" not in part, (name, part)
        for variant, v in part.get("variants", {}).items():
            assert v["loss_finite"] and v["step_s"] > 0, (name, variant)
    stage1 = record["parts"]["sd15_stage1"]
    assert stage1["variants"]["none"]["flops_per_step"] > 0 and stage1["generation"]["s_per_image"] > 0
    assert [r["op"] for r in stage1["variants"]["best"]["profile"]]
    ica = record["parts"]["sd15_ica"]["variants"]
    # ICA adds a second UNet pass, a VAE decode and the ArcFace backward to the stage-1 step
    assert ica["best"]["flops_per_step"] > stage1["variants"]["best"]["flops_per_step"]
    page = (tmp_path / "scale_dry_run.md").read_text()
    for name in expected - {"matmul_peak"}:
        assert f"{name}" in page
