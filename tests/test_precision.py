import torch

from engine.precision import DynamicLossScaler, unscale_and_check


def test_scaler_grows_after_window():
    s = DynamicLossScaler(initial_scale=8.0, growth_interval=3, hysteresis=1)
    for _ in range(3):
        s.update(False)
    assert s.scale == 16.0
    for _ in range(2):
        s.update(False)
    assert s.scale == 16.0


def test_scaler_backs_off_with_hysteresis_and_counts_skips():
    s = DynamicLossScaler(initial_scale=1024.0, growth_interval=100, hysteresis=2, min_scale=256.0)
    s.update(True)
    assert s.scale == 1024.0 and s.skipped_steps == 1  # first overflow tolerated by hysteresis
    s.update(True)
    assert s.scale == 512.0 and s.skipped_steps == 2
    s.update(False)
    s.update(True)
    s.update(True)
    assert s.scale == 256.0
    s.update(True)
    s.update(True)
    assert s.scale == 256.0  # floor


def test_unscale_detects_inf():
    g = [torch.ones(3) * 4, torch.ones(2)]
    assert not unscale_and_check(g, 4.0)
    assert torch.equal(g[0], torch.ones(3))
    assert unscale_and_check([torch.tensor([1.0, float("inf")])], 2.0)
    assert unscale_and_check([torch.tensor([float("nan")])], 1.0)


def test_fp16_training_skips_overflowing_step(make_tiny_config, monkeypatch):
    """An inf gradient makes the loop skip the update, count it and back the scale off."""
    from engine.train import loop

    cfg = make_tiny_config(precision={"dtype": "fp16", "initial_loss_scale": 2.0 ** 16, "hysteresis": 1},
                           train={"iters": 3})
    calls = {"n": 0}
    real = loop.unscale_and_check

    def poisoned(grads, scale):
        calls["n"] += 1
        grads = list(grads)
        if calls["n"] == 2:
            grads[0].view(-1)[0] = float("inf")
        return real(grads, scale)

    monkeypatch.setattr(loop, "unscale_and_check", poisoned)
    result = loop.train(cfg)
    assert result.skipped_steps == 1
    lines = (result.out_dir / "metrics.jsonl").read_text().splitlines()
    assert lines
