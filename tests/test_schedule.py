import math

import pytest

from engine.config import OptimConfig
from engine.optim import lr_at


def cfg(**kw):
    base = dict(lr=1.0, min_lr=0.1, warmup_iters=10, decay="cosine", decay_iters=None, warmup_init_lr=0.0)
    base.update(kw)
    return OptimConfig(**base)


def test_warmup_linear():
    c = cfg()
    assert lr_at(0, c, 110) == pytest.approx(0.1)
    assert lr_at(4, c, 110) == pytest.approx(0.5)
    assert lr_at(9, c, 110) == pytest.approx(1.0)


def test_cosine():
    c = cfg()
    assert lr_at(10, c, 110) == pytest.approx(1.0)
    assert lr_at(60, c, 110) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, c, 110) == pytest.approx(0.1)
    assert lr_at(500, c, 110) == pytest.approx(0.1)


def test_linear_and_decay_iters():
    c = cfg(decay="linear", decay_iters=60)
    assert lr_at(35, c, 1000) == pytest.approx(1.0 - 0.9 * 0.5)
    assert lr_at(60, c, 1000) == pytest.approx(0.1)


def test_wsd():
    c = cfg(decay="wsd", wsd_decay_fraction=0.2)  # decay over the last 20 of 100 post-warmup steps
    assert lr_at(50, c, 110) == pytest.approx(1.0)
    assert lr_at(89, c, 110) == pytest.approx(1.0)
    assert lr_at(100, c, 110) == pytest.approx(1.0 - 0.9 * 0.5)
    assert lr_at(110, c, 110) == pytest.approx(0.1)


def test_constant_and_no_warmup():
    assert lr_at(1000, cfg(decay="constant"), 10) == 1.0
    assert lr_at(0, cfg(warmup_iters=0), 100) == pytest.approx(1.0)
