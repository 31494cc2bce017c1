"""examples/training.py (the examples' training loop pieces, not part of the fastattn package):
schedule values, clipping, accumulation, checkpoints, loss, param groups."""
import io
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
if EXAMPLES not in sys.path:  # the examples import it from beside them, as ``training``
    sys.path.insert(0, EXAMPLES)
import training  # noqa: E402


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(11, 8), nn.LayerNorm(8), nn.Linear(8, 11))


def test_schedule_values():
    warmup, total, low = 10, 110, 0.1
    f = [training.lr_lambda(s, warmup, total, low) for s in range(130)]
    assert f[0] == pytest.approx(0.1) and f[4] == pytest.approx(0.5) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0)  # decay starts at its peak
    assert f[60] == pytest.approx(low + (1 - low) * 0.5)  # half way down the cosine: its midpoint
    assert f[35] == pytest.approx(low + (1 - low) * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert f[110] == pytest.approx(low) and f[129] == pytest.approx(low)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone after warmup


def test_scheduler_drives_the_optimizer():
    model = _model()
    opt = training.make_optimizer(model, lr=2.0)
    sched = training.make_scheduler(opt, warmup=4, total=20, min_ratio=0.0)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert seen[12] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 8 / 16)))


def test_param_groups_decay_only_matrices():
    model = _model()
    model[2].weight = model[0].weight  # tied: must appear once
    decay, no_decay = training.param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [tuple(p.shape) for p in decay["params"]] == [(11, 8)]
    assert sorted(tuple(p.shape) for p in no_decay["params"]) == [(8,), (8,), (11,)]


def test_clipping():
    model = _model()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 10
    before = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    norm = training.clip_gradients(model, 1.0)
    after = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    assert norm == pytest.approx(before, rel=1e-5) and after == pytest.approx(1.0, rel=1e-4)
    # under the limit nothing changes; None only measures
    assert training.clip_gradients(model, 5.0) == pytest.approx(1.0, rel=1e-4)
    assert training.clip_gradients(model, None) == pytest.approx(1.0, rel=1e-4)


def _loss_fn(model):
    def loss_fn(batch):
        x, y = batch
        return training.cross_entropy(model(x), y), int((y != -100).sum())
    return loss_fn


def test_accumulation_equals_a_big_batch():
    torch.manual_seed(1)
    x = torch.randint(0, 11, (6, 5))
    y = torch.randint(0, 11, (6, 5))
    y[0, :3] = -100  # uneven token counts per micro-batch: the weighting must use the counts
    y[4, 1] = -100
    grads = []
    for chunks in ([(x, y)], [(x[:1], y[:1]), (x[1:4], y[1:4]), (x[4:], y[4:])]):
        model = _model(seed=3)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: read the gradients via the hook
        captured = {}
        opt.register_step_pre_hook(lambda o, a, k: captured.update(
            {i: p.grad.clone() for i, p in enumerate(model.parameters())}))
        trainer = training.Trainer(model, opt, grad_clip=None)
        loss, _ = trainer.step(chunks, _loss_fn(model))
        grads.append((loss, captured))
    (loss_a, ga), (loss_b, gb) = grads
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for i in ga:
        torch.testing.assert_close(ga[i], gb[i], rtol=1e-5, atol=1e-7)


def test_label_smoothing_loss():
    logits = torch.randn(4, 7)
    y = torch.tensor([1, 2, -100, 6])
    eps = 0.2
    logp = logits.log_softmax(-1)[[0, 1, 3]]
    target = torch.full((3, 7), eps / 7)
    target[torch.arange(3), y[[0, 1, 3]]] += 1 - eps
    expected = -(target * logp).sum(-1).mean()
    torch.testing.assert_close(training.cross_entropy(logits, y, eps), expected)


def test_checkpoint_round_trip(tmp_path):
    def make():
        model = _model(seed=5)
        opt = training.make_optimizer(model, lr=1e-2)
        return model, training.Trainer(model, opt, training.make_scheduler(opt, 2, 10))

    x, y = torch.randint(0, 11, (4, 5)), torch.randint(0, 11, (4, 5))
    model, trainer = make()
    for _ in range(3):
        trainer.step([(x, y)], _loss_fn(model))
    path = str(tmp_path / "ck" / "model.pt")
    trainer.save(path, note="hello")
    ref_rng = torch.get_rng_state()
    # continue the original for two steps
    for _ in range(2):
        trainer.step([(x, y)], _loss_fn(model))
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    # a fresh model resumed from the checkpoint reaches the same weights
    model2, trainer2 = make()
    torch.manual_seed(123)
    extra = trainer2.load(path)
    assert extra == {"note": "hello"} and trainer2.step_count == 3
    assert torch.equal(torch.get_rng_state(), ref_rng)
    assert trainer2.lr == pytest.approx(trainer.optimizer.param_groups[0]["initial_lr"]
                                         * training.lr_lambda(3, 2, 10))
    for _ in range(2):
        trainer2.step([(x, y)], _loss_fn(model2))
    for k, v in model2.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)


def test_autocast_is_a_no_op_on_cpu():
    with training.autocast("cpu", "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        training.autocast("cpu", "fp8")


def test_progress_line():
    out = io.StringIO()
    p = training.Progress(total=4, every=2, name="t", file=out)
    for s in range(1, 5):
        p.update(s, loss=1.0 / s, tokens=100, lr=1e-3)
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("t 2/4 | loss 0.5000 | lr 1.00e-03 |") and "tok/s" in lines[0]


def test_a_small_model_learns():
    # sanity: the whole loop (AdamW, schedule, clipping) fits a fixed mapping
    torch.manual_seed(0)
    model = _model()
    opt = training.make_optimizer(model, lr=3e-2, weight_decay=0.0)
    trainer = training.Trainer(model, opt, training.make_scheduler(opt, 5, 100))
    x = torch.arange(11).repeat(4, 1)
    y = (x * 3 + 1) % 11
    first = trainer.step([(x, y)], _loss_fn(model))[0]
    for _ in range(99):
        last = trainer.step([(x, y)], _loss_fn(model))[0]
    assert last < 0.05 * first
    assert (model(x).argmax(-1) == y).all()
    assert F.cross_entropy(model(x).reshape(-1, 11), y.reshape(-1)) < 0.1


def test_training_is_not_part_of_the_package():
    import importlib.util

    assert importlib.util.find_spec("fastattn.training") is None
    assert os.path.dirname(os.path.abspath(training.__file__)) == EXAMPLES


def test_tiny_defaults_yield_to_explicit_flags():
    import argparse
    p = training.add_common_args(argparse.ArgumentParser(), default_steps=100)
    p.add_argument("--width", type=int, default=64)
    args = training.parse_args(p, ["--tiny", "--steps", "7"], tiny=dict(width=8, steps=2))
    assert (args.width, args.steps) == (8, 7)
    assert training.parse_args(p, [], tiny=dict(width=8)).width == 64
