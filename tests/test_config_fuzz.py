"""Property-based fuzzing of the configuration: random values of every YAML-able kind for every field.

The fields are read from the dataclasses (typing.get_type_hints), so a new field is fuzzed without
touching this file. Properties:
  * config_from_dict returns a Config or raises ConfigError -- never another exception type;
  * a returned Config satisfies the documented ranges, re-checked here independently of engine/config.py
    (every numeric field must have an entry in INVARIANTS: a new one fails `test_every_numeric_field_...`);
  * `tessera config show FILE` in-process: exit 0 for a valid config, exit 2 with a one-line message and
    no traceback for an invalid one.
Deterministic (derandomize, no example database); about 200 examples per test.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Literal, Union

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.cli import main as cli_main
from engine.config import Config, ConfigError, DatasetSpec, config_from_dict, dump_yaml, load_config, load_yaml

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
NoneType = type(None)


def _sections() -> dict[str, type]:
    return dict(typing.get_type_hints(Config))


def _leaves() -> dict[str, Any]:
    """'section.field' -> annotation, for every field of every section."""
    return {f"{sec}.{name}": tp for sec, cls in _sections().items() for name, tp in typing.get_type_hints(cls).items()}


LEAVES = _leaves()
SPEC_HINTS = typing.get_type_hints(DatasetSpec)


# --------------------------------------------------------------------------- strategies

SPECIAL_INTS = [0, -1, 1, 2, 3, 4, 8, 64, 128, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 63 - 1, 2 ** 63, -2 ** 63, 10 ** 30,
                10 ** 400]
SPECIAL_FLOATS = [0.0, -0.0, 1e-3, 1e-8, 0.5, 0.9, 1.0, 1.5, 2.0, 1e6, 1e300, math.inf, -math.inf, math.nan]
SPECIAL_STRINGS = ["", " ", "1e-3", "2E5", ".inf", "auto", "byte", "hf:", "hf:tok.json", "sentencepiece:", "meta",
                   "scan", "tiny", "gpt2", "llama", "../../../x", ".hidden", "a/b", "ok-name_1.0", "x" * 101,
                   "builtin:pydoc", "98,2,0", "nan,1,1", "1,2", "\0", "true", "null", "rmsnorm", "1f1b"]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.sampled_from(SPECIAL_INTS),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(SPECIAL_FLOATS),
    st.text(max_size=12), st.sampled_from(SPECIAL_STRINGS),
)
keys = st.one_of(st.text(max_size=6), st.sampled_from(["path", "weight", "name"]))
yaml_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(keys, inner, max_size=4), max_leaves=8)


def typed(tp: Any) -> st.SearchStrategy:
    """Values of the annotation's own type (often valid, often just out of range)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return st.sampled_from(typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return st.one_of([typed(a) for a in typing.get_args(tp)])
    if tp is NoneType:
        return st.none()
    if origin is list:
        (inner,) = typing.get_args(tp)
        return st.lists(typed(inner), max_size=4)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return st.one_of(st.fixed_dictionaries({}, optional={n: typed(t) for n, t in hints.items()}),
                         st.sampled_from(["a.txt", "builtin:pydoc", ""]))
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.one_of(st.integers(-3, 300), st.sampled_from(SPECIAL_INTS))
    if tp is float:
        return st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(SPECIAL_FLOATS),
                         st.integers(-3, 10))
    if tp is str:
        return st.one_of(st.text(max_size=12), st.sampled_from(SPECIAL_STRINGS))
    raise AssertionError(f"no strategy for {tp!r}")


def any_value(tp: Any) -> st.SearchStrategy:
    return st.one_of(typed(tp), yaml_values)


@st.composite
def trees(draw, value: typing.Callable[[Any], st.SearchStrategy]) -> dict:
    """A few random fields (random combinations) of random sections, with random values."""
    names = draw(st.lists(st.sampled_from(sorted(LEAVES)), min_size=1, max_size=5, unique=True))
    tree: dict = {}
    for name in names:
        sec, key = name.split(".")
        tree.setdefault(sec, {})[key] = draw(value(LEAVES[name]))
    return tree


# --------------------------------------------------------------------------- independent invariants


def _int(lo: float = -math.inf, hi: float = math.inf) -> typing.Callable[[Any], bool]:
    return lambda v: type(v) is int and lo <= v <= hi


def _float(lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = True) -> typing.Callable:
    def ok(v: Any) -> bool:
        return (type(v) is float and math.isfinite(v) and (v > lo if lo_open else v >= lo)
                and (v < hi if hi_open else v <= hi))
    return ok


def _opt(pred: typing.Callable) -> typing.Callable:
    return lambda v: v is None or pred(v)


POS, NONNEG, SEED = _int(1), _int(0), _int(0, 2 ** 32 - 1)
INVARIANTS: dict[str, typing.Callable[[Any], bool]] = {
    "model.vocab_size": NONNEG, "model.vocab_pad_multiple": POS, "model.d_model": POS, "model.n_layers": POS,
    "model.n_heads": POS, "model.n_kv_heads": _opt(POS), "model.head_dim": _opt(POS), "model.ffn_hidden": _opt(POS),
    "model.max_seq_len": POS, "model.norm_eps": _float(0, lo_open=True), "model.rope_theta": _float(0, lo_open=True),
    "model.dropout": _float(0, 1), "model.init_std": _float(0, lo_open=True),
    "model.rope_scaling_factor": _float(1), "model.rope_low_freq_factor": _float(0, lo_open=True),
    "model.rope_high_freq_factor": _float(0, lo_open=True), "model.rope_original_max_seq_len": POS,
    "model.type_vocab_size": NONNEG,
    "data.seq_len": NONNEG, "data.seed": SEED,
    "data.train": lambda v: len(v) >= 1 and all(_float(0, lo_open=True)(d.weight) for d in v),
    "data.valid": lambda v: all(_float(0, lo_open=True)(d.weight) for d in v),
    "parallel.tp": POS, "parallel.pp": POS, "parallel.vpp": POS, "parallel.dp": lambda v: v == "auto" or POS(v),
    "parallel.pp_layout": _opt(lambda v: all(NONNEG(x) for x in v)),
    "parallel.timeout_minutes": _float(0, 1e6, lo_open=True, hi_open=False),
    "train.micro_batch_size": POS, "train.global_batch_size": POS, "train.iters": NONNEG,
    "train.eval_interval": NONNEG, "train.eval_iters": NONNEG, "train.log_interval": POS, "train.seed": SEED,
    "train.sample_tokens": NONNEG, "train.max_bad_steps": NONNEG, "train.bad_step_window": NONNEG,
    "train.loss_spike_zscore": _float(0), "train.loss_spike_window": NONNEG,
    "train.straggler_factor": _float(1, lo_open=True),
    "train.recompute_every": POS,
    "train.mask_prob": _float(0, 1, lo_open=True, hi_open=True), "train.mask_replace": _float(0, 1, hi_open=False),
    "train.mask_random": _float(0, 1, hi_open=False), "train.nsp_weight": _float(0),
    "optim.lr": _float(0, lo_open=True), "optim.min_lr": _float(0), "optim.weight_decay": _float(0),
    "optim.betas": lambda v: len(v) == 2 and all(_float(0, 1)(b) for b in v), "optim.eps": _float(0, lo_open=True),
    "optim.grad_clip": _float(0), "optim.warmup_iters": NONNEG, "optim.warmup_init_lr": _float(0),
    "optim.decay_iters": _opt(POS), "optim.wsd_decay_fraction": _float(0, 1, lo_open=True, hi_open=False),
    "precision.initial_loss_scale": _float(0, lo_open=True), "precision.loss_scale_window": POS,
    "precision.min_loss_scale": _float(0, lo_open=True), "precision.hysteresis": POS,
    "checkpoint.interval": NONNEG, "checkpoint.keep": NONNEG, "checkpoint.keep_every": NONNEG,
    "checkpoint.time_limit": _opt(_float(0, lo_open=True)), "checkpoint.start_iteration": _opt(NONNEG),
    "optim.cooldown_iters": _opt(POS),
}
NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


def _is_numeric(tp: Any) -> bool:
    if tp in (int, float):
        return True
    return any(_is_numeric(a) for a in typing.get_args(tp) if a is not NoneType and not isinstance(a, str))


def _conforms(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return any(value == c and type(value) is type(c) for c in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return any(_conforms(value, a) for a in typing.get_args(tp))
    if tp is NoneType:
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, typing.get_args(tp)[0]) for v in value)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return isinstance(value, tp) and all(_conforms(getattr(value, n), t) for n, t in hints.items())
    return type(value) is tp


def _blank(s: str) -> bool:
    return not s.strip() or "\0" in s


def check_invariants(cfg: Config) -> None:
    for name, tp in LEAVES.items():
        sec, key = name.split(".")
        value = getattr(getattr(cfg, sec), key)
        assert _conforms(value, tp), (name, value)
        if name in INVARIANTS:
            assert INVARIANTS[name](value), (name, value)
    m, d, p, t, o, pr = cfg.model, cfg.data, cfg.parallel, cfg.train, cfg.optim, cfg.precision
    kv = m.n_kv_heads or m.n_heads
    assert m.n_heads % kv == 0 and m.n_heads % p.tp == 0
    assert (m.head_dim or m.d_model // m.n_heads) >= 1
    assert 1 <= cfg.seq_len <= m.max_seq_len
    for split in ("train", "valid"):
        names = [ds.name for ds in getattr(d, split) if ds.name is not None]
        assert len(names) == len(set(names)), names
        assert all(NAME_RE.fullmatch(n) for n in names), names
        assert all(not _blank(ds.path) for ds in getattr(d, split))
    assert not _blank(t.out_dir) and (d.cache_dir is None or not _blank(d.cache_dir))
    assert d.tokenizer == "byte" or re.fullmatch(r"(sentencepiece|hf):.*\S.*", d.tokenizer, re.S)
    parts = [float(x) for x in d.split.replace("/", ",").split(",")]
    assert len(parts) == 3 and all(math.isfinite(x) and x >= 0 for x in parts) and parts[0] > 0
    assert t.global_batch_size % t.micro_batch_size == 0
    stages = p.pp * p.vpp
    assert sum(p.pp_layout) == m.n_layers and len(p.pp_layout) == stages if p.pp_layout else m.n_layers % stages == 0
    assert o.min_lr <= o.lr and o.warmup_init_lr <= o.lr
    assert o.decay_iters is None or o.decay_iters > o.warmup_iters
    assert pr.min_loss_scale <= pr.initial_loss_scale
    assert t.max_bad_steps == 0 or t.bad_step_window >= max(t.max_bad_steps, 1)
    assert t.loss_spike_zscore == 0 or t.loss_spike_window >= 2
    assert (t.recompute == "full" or t.recompute_every == 1) and t.recompute_every <= m.n_layers
    assert not (t.compile and p.pp > 1 and p.schedule == "zb")
    assert t.objective == "causal" or t.mask_replace + t.mask_random <= 1.0
    assert m.encoder or not m.binary_head
    assert not m.encoder or (m.position != "none" and t.sample_prompt is None)


def build(tree: dict) -> Config | None:
    """config_from_dict, which may only return a Config or raise a one-line ConfigError."""
    try:
        cfg = config_from_dict(tree)
    except ConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg, msg
        return None
    assert isinstance(cfg, Config)
    check_invariants(cfg)
    return cfg


# --------------------------------------------------------------------------- the properties


def test_every_numeric_field_has_an_independent_invariant():
    numeric = {name for name, tp in LEAVES.items() if _is_numeric(tp)}
    missing = numeric - set(INVARIANTS)
    assert not missing, f"add the valid range of {sorted(missing)} to INVARIANTS (and to the field's bounds)"
    assert set(INVARIANTS) <= set(LEAVES), set(INVARIANTS) - set(LEAVES)


FLOAT_FIELDS = [name for name, tp in LEAVES.items() if tp is float or tp == list[float]]
FLOAT_FIELDS += [f"data.{split}[0].{n}" for split in ("train", "valid") for n, tp in SPEC_HINTS.items() if tp is float]


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_every_float_field_rejects_non_finite(field, bad):
    if "[0]." in field:
        head, key = field.split("[0].")
        sec, split = head.split(".")
        tree = {sec: {split: [{"path": "a.txt", key: bad}]}}
    else:
        sec, key = field.split(".")
        tree = {sec: {key: [0.9, bad] if LEAVES[field] == list[float] else bad}}
    shown = re.escape(str(bad))
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)}(\[1\])?: expected a finite number, found {shown}$"):
        config_from_dict(tree)


def test_defaults_satisfy_the_invariants():
    check_invariants(config_from_dict({}))


@SETTINGS
@given(trees(any_value))
def test_any_yaml_values_give_a_config_or_a_config_error(tree):
    build(tree)


@SETTINGS
@given(trees(typed))
def test_typed_values_give_a_config_within_the_ranges_or_a_config_error(tree):
    build(tree)


@pytest.mark.parametrize("name", sorted(LEAVES))
@settings(SETTINGS, max_examples=30)
@given(data=st.data())
def test_each_field_alone_with_every_kind_of_value(name, data):
    sec, key = name.split(".")
    build({sec: {key: data.draw(any_value(LEAVES[name]), label=name)}})


OVERRIDE_TEXTS = ["0x_", "0b_", "-0x_", "2024-13-45", "=", "[1,", "{a: 1, a: 2}", "&a [*a]",
                  "!!python/object:os.system", "!!binary AAAA", "!!set {a}", "1e999", "-.inf", ".NaN", "9" * 5000,
                  "1:30", "1:30.5", "0o17", "012",
                  "<<", "? a", "- x", "a: b", "'", '"\\x"', "%YAML 1.2", "---", "...", "\t", "@x", "`x", "|\n  x",
                  "[" * 200]


@SETTINGS
@given(name=st.sampled_from(sorted(LEAVES)),
       text=st.one_of(st.text(max_size=20), st.sampled_from(OVERRIDE_TEXTS), st.sampled_from(SPECIAL_STRINGS)))
def test_override_text_gives_a_config_or_a_config_error(name, text):
    try:
        cfg = load_config(None, [f"{name}={text}"])
    except ConfigError as e:
        assert str(e) and "\n" not in str(e), str(e)
        return
    check_invariants(cfg)


@SETTINGS
@given(tree=st.one_of(trees(typed), trees(any_value)))
def test_cli_config_show_exit_codes(tree, tmp_path, capsys, monkeypatch):
    for var in ("TESSERA_DEBUG", "WORLD_SIZE", "SLURM_NTASKS"):  # no traceback on purpose, no "(rank r/w)"
        monkeypatch.delenv(var, raising=False)
    text = dump_yaml(tree)
    assert repr(load_yaml(text)) == repr(tree)  # the file says exactly what the tree says (nan != nan, hence repr)
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    expected = build(tree)
    capsys.readouterr()
    rc = cli_main(["config", "show", str(path)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    if expected is None:
        assert rc == 2, (rc, out, err)
        assert err.startswith("tessera: error: ") and err.count("\n") == 1, err
    else:
        assert rc == 0 and err == "", (rc, err)
        assert load_config(path).to_dict() == expected.to_dict()
        shown = config_from_dict(load_yaml(out))  # `config show` prints a config that reads back as itself
        assert shown.to_dict() == expected.to_dict()
