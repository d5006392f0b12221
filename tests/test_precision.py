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

# The loop's skip / backoff / every-rank behaviour is tested through the real loop in
# tests/parallel/test_train_zero3_fp16.py (one process and 2 ranks, ZeRO 0/1/3).
