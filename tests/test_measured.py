"""MeasuredChoice: the per-shape choice of the fastest agreeing implementation (attention, GroupNorm)."""

import pytest
import torch

from xgem_dist.model.measured import MeasuredChoice, forward_backward_seconds


def test_keeps_the_fastest_agreeing_candidate_per_shape_and_measures_once(caplog):
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def broken(q, k, v):
        raise RuntimeError("No available kernel")

    def same(q, k, v):
        return sdpa(q, k, v).clone()

    def doubled(q, k, v):  # the fastest, but wrong
        return 2 * sdpa(q, k, v)

    seconds = {sdpa: 3e-3, same: 1e-3, doubled: 1e-4}
    timed = []

    def timer(fn, q, k, v):
        fn(q, k, v)
        timed.append(fn)
        return seconds[fn]

    choice = MeasuredChoice("attention", {"sdpa": sdpa, "same": same, "doubled": doubled, "broken": broken,
                                          "excluded": sdpa},
                            applies=lambda name, *args: name != "excluded", timer=timer)
    q, k, v = torch.randn(2, 4, 10, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    with caplog.at_level("WARNING"):
        for _ in range(3):
            assert torch.equal(choice(q, k, v), same(q, k, v))
    assert "attention candidate doubled left out" in caplog.text
    assert len(timed) == 2  # each agreeing candidate that applies, once: later calls reuse the choice
    ((signature, (name, measured)),) = choice.choices.items()
    assert name == "same" and measured == {"sdpa": 3e-3, "same": 1e-3}
    assert signature == tuple((tuple(x.shape), torch.float32, "cpu") for x in (q, k, v))
    seconds[same] = 5e-3  # a new shape is measured anew
    assert torch.equal(choice(q[:, :, :3], k, v), sdpa(q[:, :, :3], k, v)) and len(timed) == 4
    with pytest.raises(RuntimeError, match="no attention implementation"):
        MeasuredChoice("attention", {"broken": broken}, timer=lambda fn, q, k, v: fn(q, k, v))(q, k, v)


def test_forward_backward_timer_runs_both_passes():
    calls = []

    def attend(q, k, v):
        calls.append(q.requires_grad)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    q = torch.randn(1, 2, 5, 8)
    assert forward_backward_seconds(attend, q, q, q, repeats=3) > 0
    assert calls == [True] * 5  # 2 warm-ups + 3 timed, with gradients (a training step's cost)


@pytest.mark.parametrize("reentrant", [False, True])
def test_auto_measures_inside_activation_checkpointing(reentrant):
    """The first call of a shape measures a separate forward+backward inside the model's forward; under
    (diffusers' non-reentrant) activation checkpointing that must not disturb the checkpoint's bookkeeping."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.manual_seed(0)
    proj = torch.nn.Linear(8, 8)

    def block(x, choice):
        q = proj(x).view(2, 5, 2, 4).transpose(1, 2)
        return choice(q, q, q).transpose(1, 2).reshape(2, 5, 8)

    x = torch.randn(2, 5, 8, requires_grad=True)  # reentrant checkpointing needs an input with gradients
    grads = []
    for checkpointed in (True, False):
        choice = MeasuredChoice("attention", {"a": sdpa, "b": lambda q, k, v: sdpa(q, k, v)})  # the real timer
        proj.zero_grad()
        if checkpointed:
            out = torch.utils.checkpoint.checkpoint(block, x, choice, use_reentrant=reentrant)
        else:
            out = block(x, choice)
        out.square().sum().backward()
        grads.append(proj.weight.grad.clone())
        assert len(choice.choices) == 1
    assert torch.allclose(grads[0], grads[1])


def test_agreement_is_judged_at_the_less_precise_output():
    """Under autocast torch's GroupNorm returns fp32 and the fused kernel bf16: bf16 rounding is agreement."""
    def reference(x):
        return x * 2

    def lower(x):
        return (x * 2).bfloat16()

    def wrong(x):
        return (x * 2.5).bfloat16()

    choice = MeasuredChoice("op", {"reference": reference, "lower": lower, "wrong": wrong},
                            timer=lambda fn, x: {reference: 2.0, lower: 1.0, wrong: 0.5}[fn])
    choice(torch.randn(256))
    ((name, seconds),) = choice.choices.values()
    assert name == "lower" and set(seconds) == {"reference", "lower"}
