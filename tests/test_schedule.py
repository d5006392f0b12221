import dataclasses
import math
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import ConfigError, OptimConfig, config_from_dict, dump_yaml, load_config, load_yaml
from engine.optim import lr_at
from engine.optim.schedule import DECAY_SHAPES, decay_shape


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


# --------------------------------------------------------------------------- second phase: shapes, cooldown, rewarm
# Schedules against their closed forms (hypothesis, many steps), endpoints, monotonicity, rewarm from a low LR
# to a new peak, resume mid-decay (lr_at is a pure function of step and config), and the config's checks.

FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None)
SHAPES = list(DECAY_SHAPES)


def _legacy_lr_at(step, c, total_iters):
    """lr_at as it was before the shapes and cooldown were added (frozen copy): old configs must match it."""
    warmup = c.warmup_iters
    if step < warmup:
        return c.warmup_init_lr + (c.lr - c.warmup_init_lr) * (step + 1) / warmup
    if c.decay == "constant":
        return c.lr
    decay_iters = c.decay_iters if c.decay_iters is not None else total_iters
    if step >= decay_iters:
        return c.min_lr
    span = max(decay_iters - warmup, 1)
    progress = (step - warmup) / span
    if c.decay == "cosine":
        return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1.0 + math.cos(math.pi * progress))
    if c.decay == "linear":
        return c.lr - (c.lr - c.min_lr) * progress
    decay_start = 1.0 - c.wsd_decay_fraction
    if progress < decay_start:
        return c.lr
    return c.lr - (c.lr - c.min_lr) * (progress - decay_start) / c.wsd_decay_fraction


def closed_form(shape, q, peak, low):
    """The three decay shapes, written out independently of engine/optim/schedule.py."""
    return {"linear": low + (peak - low) * (1 - q),
            "cosine": low + (peak - low) * (1 + math.cos(math.pi * q)) / 2,
            "1-sqrt": low + (peak - low) * (1 - math.sqrt(q))}[shape]


@st.composite
def runs(draw, decay=None, cooldown=None):
    """(OptimConfig, total_iters) with warmup < total and, for a cooldown, warmup + cooldown <= total."""
    lr = draw(st.floats(1e-6, 1.0))
    min_lr = draw(st.floats(0.0, 1.0)) * lr
    warmup = draw(st.integers(0, 50))
    total = warmup + draw(st.integers(1, 400))
    kw = dict(lr=lr, min_lr=min_lr, warmup_iters=warmup, warmup_init_lr=draw(st.floats(0.0, 1.0)) * lr,
              decay=decay or draw(st.sampled_from(["cosine", "linear", "wsd", "constant"])),
              wsd_decay_shape=draw(st.sampled_from(SHAPES)),
              wsd_decay_fraction=draw(st.sampled_from([1.0, 0.5, 0.2, 0.1]) | st.floats(0.01, 1.0)))
    if cooldown or (cooldown is None and kw["decay"] in ("wsd", "constant") and draw(st.booleans())):
        kw["cooldown_iters"] = draw(st.integers(1, total - warmup))
    if kw["decay"] != "wsd" and kw.get("cooldown_iters") is None:
        kw["wsd_decay_shape"] = "linear"
    return OptimConfig(**kw), total


def test_decay_shapes_at_known_points():
    for q, expect in [(0.0, 1.0), (0.25, 0.5), (1.0, 0.0)]:
        assert decay_shape("1-sqrt", q, 1.0, 0.0) == pytest.approx(expect)
    assert decay_shape("cosine", 0.5, 1.0, 0.2) == pytest.approx(0.6)
    assert decay_shape("linear", 0.75, 1.0, 0.2) == pytest.approx(0.4)
    for shape in SHAPES:
        assert decay_shape(shape, 0.0, 0.7, 0.1) == pytest.approx(0.7)
        assert decay_shape(shape, 1.0, 0.7, 0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="wsd_decay_shape"):
        decay_shape("sqrt", 0.5, 1.0, 0.0)


@FAST
@given(st.data())
def test_old_configs_give_the_old_values_bit_for_bit(data):
    c, total = data.draw(runs(cooldown=False))
    c.wsd_decay_shape = "linear"
    decay_iters = data.draw(st.none() | st.integers(c.warmup_iters + 1, total + 100))
    c.decay_iters = decay_iters
    for step in range(0, total + 3, max(1, total // 60)):
        assert lr_at(step, c, total) == _legacy_lr_at(step, c, total)


@FAST
@given(st.data())
def test_wsd_fraction_each_shape_against_its_formula(data):
    c, total = data.draw(runs(decay="wsd", cooldown=False))
    span = total - c.warmup_iters
    start = c.warmup_iters + (1 - c.wsd_decay_fraction) * span  # the final decay starts here (a real number)
    for step in data.draw(st.lists(st.integers(c.warmup_iters, total + 5), min_size=1, max_size=40)):
        got = lr_at(step, c, total)
        if step >= total:
            assert got == c.min_lr
        elif step < start:
            assert got == c.lr
        else:
            q = (step - start) / (c.wsd_decay_fraction * span)
            assert got == pytest.approx(closed_form(c.wsd_decay_shape, q, c.lr, c.min_lr), rel=1e-9, abs=1e-15)


@FAST
@given(st.data())
def test_cooldown_each_shape_against_its_formula(data):
    c, total = data.draw(runs(decay=data.draw(st.sampled_from(["wsd", "constant"])), cooldown=True))
    c.wsd_decay_shape = data.draw(st.sampled_from(SHAPES))
    n = c.cooldown_iters
    for step in range(c.warmup_iters, total + 3):
        got = lr_at(step, c, total)
        if step < total - n:
            assert got == c.lr
        elif step < total:
            q = (step - (total - n)) / n
            assert got == pytest.approx(closed_form(c.wsd_decay_shape, q, c.lr, c.min_lr), rel=1e-9, abs=1e-15)
        else:
            assert got == c.min_lr


@pytest.mark.parametrize("shape", SHAPES)
def test_cooldown_endpoints_and_decay_iters(shape):
    c = cfg(decay="constant", cooldown_iters=20, wsd_decay_shape=shape)  # warmup 10, lr 1.0, min_lr 0.1
    assert lr_at(9, c, 110) == 1.0  # peak at the end of warmup
    assert lr_at(89, c, 110) == 1.0  # held until the cooldown's first step
    assert lr_at(90, c, 110) == pytest.approx(1.0)  # q = 0
    assert lr_at(100, c, 110) == pytest.approx(closed_form(shape, 0.5, 1.0, 0.1))
    assert lr_at(109, c, 110) == pytest.approx(closed_form(shape, 19 / 20, 1.0, 0.1))
    assert lr_at(110, c, 110) == 0.1 and lr_at(10 ** 6, c, 110) == 0.1
    c.decay_iters = 60  # the cooldown ends at decay_iters when it is set, whatever train.iters is
    assert lr_at(39, c, 1000) == 1.0 and lr_at(50, c, 1000) == pytest.approx(closed_form(shape, 0.5, 1.0, 0.1))
    assert lr_at(60, c, 1000) == 0.1


def test_constant_without_cooldown_and_wsd_shapes_without_cooldown():
    assert lr_at(10 ** 6, cfg(decay="constant", decay_iters=20), 30) == 1.0  # as before: never decays
    c = cfg(decay="wsd", wsd_decay_fraction=0.2, wsd_decay_shape="1-sqrt")  # decay over steps 90..110
    assert lr_at(89, c, 110) == 1.0
    assert lr_at(95, c, 110) == pytest.approx(0.1 + 0.9 * 0.5)  # q = 0.25: 1 - sqrt(0.25) = 0.5
    c.wsd_decay_shape = "cosine"
    assert lr_at(100, c, 110) == pytest.approx(0.55)


@FAST
@given(st.data())
def test_monotone_warmup_up_then_decay_down(data):
    c, total = data.draw(runs())
    lrs = [lr_at(s, c, total) for s in range(total + 2)]
    w = c.warmup_iters
    assert all(a <= b * (1 + 1e-12) for a, b in zip(lrs[:w], lrs[1:w]))  # warmup rises
    if w:
        assert lrs[w - 1] == pytest.approx(c.lr)  # peak at the end of warmup
        assert lrs[0] >= c.warmup_init_lr
    assert all(b <= a * (1 + 1e-12) + 1e-300 for a, b in zip(lrs[w:], lrs[w + 1:]))  # then never rises
    assert all(c.min_lr * (1 - 1e-12) <= x <= c.lr * (1 + 1e-12) for x in lrs[w:])
    if c.decay != "constant" or c.cooldown_iters is not None:
        assert lrs[total] == c.min_lr  # min_lr at the end


@pytest.mark.parametrize("decay", ["cosine", "linear", "wsd", "constant"])
def test_rewarm_from_the_old_min_lr_to_a_new_peak_then_redecay(decay):
    phase1 = OptimConfig(lr=3e-4, min_lr=3e-5, warmup_iters=50, decay="cosine")
    old_end = lr_at(499, phase1, 500)
    kw = dict(cooldown_iters=400, wsd_decay_shape="1-sqrt") if decay in ("wsd", "constant") else {}
    phase2 = OptimConfig(lr=1.5e-4, min_lr=1.5e-5, warmup_iters=100, warmup_init_lr=phase1.min_lr, decay=decay,
                         **kw)
    lrs = [lr_at(s, phase2, 2000) for s in range(2001)]
    assert lrs[0] == pytest.approx(3e-5 + (1.5e-4 - 3e-5) / 100)  # starts next to where phase 1 ended
    assert abs(lrs[0] - old_end) < (1.5e-4 - 3e-5) / 100 * 1.01  # no jump: one warmup increment
    assert all(b > a for a, b in zip(lrs[:100], lrs[1:100]))  # strictly rising to the new peak
    assert lrs[99] == pytest.approx(1.5e-4) and lrs[100] == pytest.approx(1.5e-4)
    assert all(b <= a for a, b in zip(lrs[100:], lrs[101:]))  # re-decays
    assert lrs[2000] == 1.5e-5
    if decay in ("wsd", "constant"):
        assert lrs[1599] == 1.5e-4 and lrs[1700] == pytest.approx(1.5e-5 + 1.35e-4 * 0.5)  # 1-sqrt at q = 1/4
    if decay == "linear":
        assert lrs[1050] == pytest.approx((1.5e-4 + 1.5e-5) / 2)


@FAST
@given(st.data())
def test_resume_mid_decay_continues_exactly(data):
    """A run stopped at any step k and resumed (a fresh config with the same fields, a fresh call per step, in
    any order) gets bit for bit the learning rates of the run that was never interrupted."""
    c, total = data.draw(runs())
    uninterrupted = [lr_at(s, c, total) for s in range(total + 1)]
    k = data.draw(st.integers(0, total))
    resumed = OptimConfig(**dataclasses.asdict(c))
    steps = list(range(k, total + 1))
    order = data.draw(st.permutations(steps)) if len(steps) < 60 else steps[::-1]
    got = {s: lr_at(s, resumed, total) for s in order}
    assert [got[s] for s in steps] == uninterrupted[k:]


@pytest.mark.parametrize("decay, shape, cooldown", [("cosine", "linear", None), ("linear", "linear", None),
                                                    ("wsd", "linear", None), ("wsd", "cosine", None),
                                                    ("wsd", "1-sqrt", 300), ("constant", "cosine", 300)])
def test_resume_mid_decay_from_the_saved_config_file(tmp_path, decay, shape, cooldown):
    """The resumed run reads its config back from YAML (as `tessera train` after a restart): the same
    learning rate at every step from the checkpoint's step on, here a step inside the decay."""
    tree = {"train": {"iters": 1000}, "optim": {"lr": 3e-4, "min_lr": 3e-5, "warmup_iters": 100,
                                               "warmup_init_lr": 1e-5, "decay": decay, "wsd_decay_shape": shape,
                                               "cooldown_iters": cooldown}}
    first = config_from_dict(tree)
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(first.to_dict()))
    k = 850  # inside every decay above
    resumed = load_config(path)
    assert lr_at(k, resumed.optim, resumed.train.iters) < first.optim.lr
    assert [lr_at(s, resumed.optim, resumed.train.iters) for s in range(k, 1001)] == \
        [lr_at(s, first.optim, 1000) for s in range(k, 1001)]


def test_open_ended_run_extended_on_resume_before_its_cooldown():
    c = cfg(decay="constant", cooldown_iters=100, wsd_decay_shape="1-sqrt")
    first = [lr_at(s, c, 1000) for s in range(900)]  # planned 1000 steps; stopped at step 600 (stable phase)
    longer = [lr_at(s, c, 3000) for s in range(3001)]  # resumed with train.iters=3000
    assert longer[:600] == first[:600]  # every step taken had the learning rate of the longer schedule
    assert longer[2899] == 1.0 and longer[2900] == pytest.approx(1.0) and longer[3000] == 0.1
    assert longer[2925] == pytest.approx(0.1 + 0.9 * 0.5)


# --------------------------------------------------------------------------- config


def test_new_fields_defaults_and_values_through_yaml_and_overrides(tmp_path):
    o = config_from_dict({}).optim
    assert o.wsd_decay_shape == "linear" and o.cooldown_iters is None
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  decay: wsd\n  wsd_decay_shape: 1-sqrt\n  cooldown_iters: 50\n")
    o = load_config(path).optim
    assert (o.decay, o.wsd_decay_shape, o.cooldown_iters) == ("wsd", "1-sqrt", 50)
    for shape in SHAPES:
        o = load_config(None, ["optim.decay=constant", f"optim.wsd_decay_shape={shape}",
                               "optim.cooldown_iters=900"]).optim  # 1000 - 100 warmup: the most that fits
        assert o.wsd_decay_shape == shape and o.cooldown_iters == 900


@pytest.mark.parametrize("overrides, message", [
    (["optim.wsd_decay_shape=sqrt"], r"^optim.wsd_decay_shape: expected one of 'linear', 'cosine', '1-sqrt', "
                                     r"found 'sqrt'$"),
    (["optim.decay=wsd", "optim.cooldown_iters=0"], r"^optim.cooldown_iters: expected null or a positive integer, "
                                                    r"found 0$"),
    (["optim.decay=constant", "optim.cooldown_iters=901"],
     r"^optim.cooldown_iters: expected at most train.iters - optim.warmup_iters = 1000 - 100 = 900 \(the cooldown "
     r"ends at train.iters and starts after warmup\), found 901$"),
    (["optim.decay=wsd", "optim.cooldown_iters=200", "optim.decay_iters=250"],
     r"^optim.cooldown_iters: expected at most optim.decay_iters - optim.warmup_iters = 250 - 100 = 150 .*found "
     r"200$"),
    (["optim.decay=cosine", "optim.cooldown_iters=10"],
     r"^optim.cooldown_iters: expected null with optim.decay=cosine \(a cooldown follows a constant lr: "
     r"optim.decay wsd or constant\), found 10$"),
    (["optim.decay=linear", "optim.wsd_decay_shape=cosine"],
     r"^optim.wsd_decay_shape: expected linear \(the default\) with optim.decay=linear: .*found cosine$"),
    (["optim.decay=constant", "optim.wsd_decay_shape=1-sqrt"],
     r"^optim.wsd_decay_shape: expected linear \(the default\) with optim.decay=constant and no "
     r"optim.cooldown_iters: .*found 1-sqrt$"),
    (["optim.wsd_decay_fraction=1.5"], r"^optim.wsd_decay_fraction: expected a number in \(0, 1\], found 1.5$"),
])
def test_schedule_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_docs_second_phase_example_is_a_valid_config():
    text = Path(__file__).resolve().parents[1].joinpath("docs/training.md").read_text()
    section = text.split("### Second phase (continued pretraining)", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    o = config_from_dict(load_yaml(block)).optim
    assert lr_at(0, o, 2000) == pytest.approx(3.12e-5) and lr_at(1700, o, 2000) == pytest.approx(8.25e-5)
    assert lr_at(1999, o, 2000) == pytest.approx(1.517e-5, rel=1e-3) and lr_at(2000, o, 2000) == 1.5e-5
