import pytest

from engine.config import ConfigError, config_from_dict, field_docs, load_config, parse_override


def test_defaults_validate():
    cfg = config_from_dict({"model": {"vocab_size": 100}})
    assert cfg.seq_len == cfg.model.max_seq_len


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'model.n_layer'.*Did you mean 'n_layers'"):
        config_from_dict({"model": {"n_layer": 4}})
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*'train'"):
        config_from_dict({"trian": {}})


def test_wrong_type_names_field_and_found_value():
    with pytest.raises(ConfigError, match=r"train.iters: expected an integer, found 'ten'"):
        config_from_dict({"train": {"iters": "ten"}})
    with pytest.raises(ConfigError, match=r"model.norm: expected one of 'rmsnorm', 'layernorm', found 'batchnorm'"):
        config_from_dict({"model": {"norm": "batchnorm"}})
    with pytest.raises(ConfigError, match=r"model.tie_embeddings: expected true or false, found 1"):
        config_from_dict({"model": {"tie_embeddings": 1}})


def test_int_accepted_for_float_but_not_bool_for_int():
    cfg = config_from_dict({"optim": {"lr": 1}})
    assert isinstance(cfg.optim.lr, float)
    with pytest.raises(ConfigError, match="train.iters"):
        config_from_dict({"train": {"iters": True}})


@pytest.mark.parametrize("tree, pattern", [
    ({"model": {"n_heads": 6, "d_model": 384}, "parallel": {"tp": 4}}, r"parallel.tp=4 must divide model.n_heads=6"),
    ({"train": {"global_batch_size": 10, "micro_batch_size": 4}}, r"global_batch_size=10 must be divisible"),
    ({"model": {"n_heads": 8, "n_kv_heads": 3}}, r"n_kv_heads: expected a divisor of n_heads=8, found 3"),
    ({"model": {"n_layers": 6}, "parallel": {"pp": 4}}, r"n_layers=6 does not divide into pp\*vpp"),
    ({"parallel": {"sequence_parallel": True}}, r"sequence_parallel: needs parallel.tp > 1"),
    ({"data": {"seq_len": 4096}, "model": {"max_seq_len": 1024}}, r"data.seq_len=4096 exceeds model.max_seq_len"),
    ({"optim": {"lr": 1e-4, "min_lr": 1e-3}}, r"min_lr <= lr"),
    ({"data": {"split": "a,b"}}, r"data.split"),
    ({"parallel": {"vpp": 2}}, r"vpp=2 needs parallel.schedule='interleaved'"),
    ({"model": {"preset": "gtp2"}}, r"unknown preset 'gtp2'.*Did you mean 'gpt2'"),
    ({"train": {"recompute_every": 2}}, r"train.recompute_every=2 applies to train.recompute=full only"),
    ({"parallel": {"zero": 3, "tp": 2}}, r"parallel.zero=3 \(FSDP2\) supports data parallelism only: .*found tp=2, pp=1"),
    ({"parallel": {"zero": 3, "pp": 2}, "model": {"n_layers": 4}}, r"parallel.zero=3 .*found tp=1, pp=2"),
])
def test_impossible_combinations(tree, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(tree)


def test_world_size_checks():
    tree = {"parallel": {"tp": 2}, "train": {"global_batch_size": 6, "micro_batch_size": 2}}
    with pytest.raises(ConfigError, match=r"tp\*pp = 2\*1 = 2 does not divide the world size 3"):
        config_from_dict(tree, world_size=3)
    with pytest.raises(ConfigError, match=r"global_batch_size=6 must be divisible by micro_batch_size\*dp = 2\*2"):
        config_from_dict(tree, world_size=4)
    assert config_from_dict(tree, world_size=6).parallel.tp == 2


def test_overrides_and_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: gpt2}\ntrain: {iters: 5}\n")
    cfg = load_config(path, ["train.iters=7", "optim.betas=[0.9, 0.99]", "model.n_layers=2", "data.train=foo.txt"])
    assert cfg.train.iters == 7 and cfg.optim.betas == [0.9, 0.99] and cfg.model.n_layers == 2
    assert cfg.model.d_model == 768 and cfg.model.norm == "layernorm"  # from the preset
    assert cfg.data.train[0].path == "foo.txt"
    with pytest.raises(ConfigError, match=r"unknown key 'train.itres'.*'iters'"):
        load_config(path, ["train.itres=3"])
    with pytest.raises(ConfigError, match="expected the form section.key=value"):
        load_config(path, ["train.iters"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_parse_override_types():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a.b=true") == (["a", "b"], True)
    assert parse_override("a.b=null") == (["a", "b"], None)


def test_round_trip_yaml(tmp_path):
    cfg = config_from_dict({"model": {"preset": "llama", "d_model": 64, "n_layers": 2, "n_heads": 4}})
    path = tmp_path / "r.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path).to_dict() == cfg.to_dict()


def test_every_field_documented():
    rows = field_docs()
    assert len(rows) > 40
    assert all(doc for _, _, doc in rows), [name for name, _, doc in rows if not doc]


# --------------------------------------------------------------------------- YAML 1.2 floats


@pytest.mark.parametrize("text, value", [
    ("1e-3", 1e-3), ("2E5", 2e5), ("-1.5e+3", -1500.0), ("1.0e5", 1e5), ("+1e2", 100.0), (".5", 0.5),
    ("-.5", -0.5), ("1_000.0", 1000.0), ("3.0e-3", 3e-3), ("1.", 1.0),
])
def test_yaml_floats_without_a_dot_are_numbers(tmp_path, text, value):
    ov = parse_override(f"optim.lr={text}")[1]
    assert isinstance(ov, float) and ov == value
    path = tmp_path / "c.yaml"
    path.write_text(f"optim:\n  lr: {text}\n  min_lr: 0\n")
    lr = load_config(path).optim.lr if value > 0 else None
    assert lr is None or lr == value


@pytest.mark.parametrize("text, value", [
    ("12", 12), ("-3", -3), ("1_000", 1000), ("0", 0), ("true", True), ("false", False), ("null", None),
    ("~", None), ("yes", True), ("'1e-3'", "1e-3"), ("2024-01-01", "2024-01-01"), ("abc", "abc"),
])
def test_yaml_ints_bools_nulls_and_strings_as_before(text, value):
    got = parse_override(f"a.b={text}")[1]
    assert got == value and type(got) is type(value)


def test_readme_example_override_lr():
    cfg = load_config("examples/tiny.yaml", ["train.iters=50", "optim.lr=1e-3"])
    assert cfg.optim.lr == 1e-3 and cfg.train.iters == 50


def test_to_yaml_quotes_strings_that_would_read_as_numbers(tmp_path):
    cfg = config_from_dict({"train": {"sample_prompt": "1e5", "out_dir": "2e-3"}, "data": {"train": ".5"}})
    path = tmp_path / "r.yaml"
    path.write_text(cfg.to_yaml())
    back = load_config(path)
    assert back.train.sample_prompt == "1e5" and back.train.out_dir == "2e-3" and back.data.train[0].path == ".5"


# --------------------------------------------------------------------------- duplicate keys


def test_duplicate_key_names_key_file_and_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("optim:\n  lr: 1.0e-3\n  min_lr: 0.0\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "duplicate key 'optim.lr'" in msg and str(path) in msg and "line 4" in msg and "line 2" in msg
    assert "\n" not in msg
    path.write_text("train: {iters: 3}\nmodel: {d_model: 64}\ntrain: {iters: 4}\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'train' at line 3 \(first given at line 1\)"):
        load_config(path)
    path.write_text("data:\n  train:\n  - {path: a.txt, weight: 1}\n  - {path: b.txt, weight: 1, path: c.txt}\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'data.train\[1\].path' at line 4"):
        load_config(path)


def test_duplicate_key_in_override_and_merge_keys_still_allowed(tmp_path):
    with pytest.raises(ConfigError, match=r"override .*duplicate key 'path'"):
        load_config(None, ["data.train={path: a, path: b}"])
    path = tmp_path / "merge.yaml"
    path.write_text("data:\n  train:\n  - &b {path: a.txt, weight: 2}\n  - {<<: *b, path: b.txt}\n")
    cfg = load_config(path)
    assert [(d.path, d.weight) for d in cfg.data.train] == [("a.txt", 2.0), ("b.txt", 2.0)]


# --------------------------------------------------------------------------- ranges


@pytest.mark.parametrize("field", ["model.n_kv_heads", "model.head_dim", "model.ffn_hidden", "optim.decay_iters"])
@pytest.mark.parametrize("value", [0, -1])
def test_optional_sizes_reject_zero_and_negatives(field, value):
    with pytest.raises(ConfigError, match=rf"^{field}: expected null or a positive integer, found {value}$"):
        load_config(None, [f"{field}={value}", "optim.warmup_iters=0"])


@pytest.mark.parametrize("tree, pattern", [
    ({"model": {"dropout": -0.1}}, r"^model.dropout: expected a number in \[0, 1\), found -0.1$"),
    ({"model": {"dropout": 1}}, r"^model.dropout: expected a number in \[0, 1\), found 1.0$"),
    ({"model": {"norm_eps": 0}}, r"^model.norm_eps: expected a finite number > 0, found 0.0$"),
    ({"model": {"rope_theta": -1}}, r"^model.rope_theta: expected a finite number > 0"),
    ({"model": {"init_std": 0}}, r"^model.init_std: expected a finite number > 0"),
    ({"model": {"vocab_pad_multiple": 0}}, r"^model.vocab_pad_multiple: expected a positive integer, found 0$"),
    ({"model": {"vocab_size": -1}}, r"^model.vocab_size: expected a non-negative integer, found -1$"),
    ({"data": {"seq_len": -5}}, r"^data.seq_len: expected a non-negative integer, found -5$"),
    ({"data": {"seed": -1}}, r"^data.seed: expected an integer in \[0, 4294967295\], found -1$"),
    ({"train": {"seed": 2 ** 32}}, r"^train.seed: expected an integer in \[0, 4294967295\]"),
    ({"data": {"train": [{"path": "a", "weight": 0}]}}, r"^data.train\[0\].weight: expected a finite number > 0"),
    ({"train": {"eval_iters": -1}}, r"^train.eval_iters: expected a non-negative integer, found -1$"),
    ({"train": {"eval_interval": -1}}, r"^train.eval_interval: expected a non-negative integer"),
    ({"train": {"sample_tokens": -1}}, r"^train.sample_tokens: expected a non-negative integer"),
    ({"train": {"log_interval": 0}}, r"^train.log_interval: expected a positive integer, found 0$"),
    ({"optim": {"warmup_init_lr": -1e-4}}, r"^optim.warmup_init_lr: expected a finite number >= 0, found -0.0001$"),
    ({"optim": {"warmup_init_lr": 1.0}}, r"^optim.warmup_init_lr: expected warmup_init_lr <= lr"),
    ({"optim": {"betas": [0.9, 1.0]}}, r"^optim.betas\[1\]: expected a number in \[0, 1\), found 1.0$"),
    ({"optim": {"betas": [0.9]}}, r"^optim.betas: expected two numbers in \[0, 1\), found \[0.9\]$"),
    ({"optim": {"eps": 0}}, r"^optim.eps: expected a finite number > 0"),
    ({"optim": {"weight_decay": -0.1}}, r"^optim.weight_decay: expected a finite number >= 0"),
    ({"optim": {"grad_clip": -1}}, r"^optim.grad_clip: expected a finite number >= 0"),
    ({"optim": {"wsd_decay_fraction": 0}}, r"^optim.wsd_decay_fraction: expected a number in \(0, 1\]"),
    ({"optim": {"lr": 0}}, r"^optim.lr: expected a finite number > 0, found 0.0$"),
    ({"parallel": {"timeout_minutes": 0}}, r"^parallel.timeout_minutes: expected a number in \(0, 1000000\]"),
    ({"parallel": {"timeout_minutes": 1e300}}, r"^parallel.timeout_minutes: expected a number in \(0, 1000000\]"),
    ({"parallel": {"dp": 0}}, r"^parallel.dp: expected a positive integer, found 0$"),
    ({"parallel": {"pp_layout": [-1]}}, r"^parallel.pp_layout\[0\]: expected a non-negative integer, found -1$"),
    ({"precision": {"hysteresis": 0}}, r"^precision.hysteresis: expected a positive integer, found 0$"),
    ({"precision": {"loss_scale_window": 0}}, r"^precision.loss_scale_window: expected a positive integer"),
    ({"precision": {"initial_loss_scale": 0}}, r"^precision.initial_loss_scale: expected a finite number > 0"),
    ({"precision": {"min_loss_scale": 4.0, "initial_loss_scale": 2.0}},
     r"^precision.min_loss_scale: expected at most precision.initial_loss_scale=2.0, found 4.0$"),
    ({"train": {"iters": 2 ** 70}}, r"^train.iters: expected a 64-bit integer, found an integer of about 22 digits$"),
    ({"optim": {"lr": 10 ** 400}}, r"^optim.lr: expected a finite number, found an integer of about 401 digits$"),
])
def test_out_of_range_values(tree, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(tree)


@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan", "1e999"])
@pytest.mark.parametrize("field", ["optim.lr", "optim.min_lr", "model.norm_eps", "optim.grad_clip",
                                   "parallel.timeout_minutes", "train.straggler_factor"])
def test_non_finite_floats_rejected(field, text):
    shown = {".inf": "inf", "-.inf": "-inf", ".nan": "nan", "1e999": "inf"}[text]
    with pytest.raises(ConfigError, match=rf"^{field}: expected a finite number, found {shown}$"):
        load_config(None, [f"{field}={text}"])


def test_lr_inf_through_the_cli_is_a_one_line_error(capsys, monkeypatch):
    from engine.cli import main

    for var in ("TESSERA_DEBUG", "WORLD_SIZE", "SLURM_NTASKS"):  # no traceback on purpose, no "(rank r/w)"
        monkeypatch.delenv(var, raising=False)
    assert main(["config", "show", "examples/tiny.yaml", "optim.lr=.inf"]) == 2
    err = capsys.readouterr().err
    assert err == "tessera: error: optim.lr: expected a finite number, found inf\n"


# --------------------------------------------------------------------------- paths and dataset names


@pytest.mark.parametrize("override, pattern", [
    ("train.out_dir=", r"^train.out_dir: expected a directory path, found ''$"),
    ("train.out_dir='   '", r"^train.out_dir: expected a directory path, found '   '$"),
    ("data.cache_dir=''", r"^data.cache_dir: expected null or a directory path, found ''$"),
    ("data.train=[{path: ''}]", r"^data.train\[0\].path: expected a file path, a .bin/.idx prefix or builtin:pydoc"),
    ("data.valid=[' ']", r"^data.valid\[0\].path: expected a file path"),
    ("data.tokenizer=", r'^data.tokenizer: expected "byte", "sentencepiece:PATH" or "hf:PATH", found \'\'$'),
    ("data.tokenizer='sentencepiece:'", r"^data.tokenizer: expected .*found 'sentencepiece:'$"),
    ("data.tokenizer='hf: '", r"^data.tokenizer: expected .*found 'hf: '$"),
])
def test_blank_paths_rejected(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_null_cache_dir_still_allowed():
    assert load_config(None, ["data.cache_dir=null"]).data.cache_dir is None
    assert load_config(None, ["data.cache_dir=cache"]).data.cache_dir == "cache"


@pytest.mark.parametrize("name", ["../../../x", "a/b", ".hidden", "..", "", "a b", "x\0y", "a" * 101, "ü", "a\\b"])
def test_bad_dataset_names_rejected(name):
    tree = {"data": {"train": ["a.txt", {"path": "b.txt", "name": name}]}}
    with pytest.raises(ConfigError, match=r"^data.train\[1\].name: expected 1-100 letters, digits, '.', '_' or '-', "
                                          r"not starting with '.', found ") as e:
        config_from_dict(tree)
    assert repr(name)[:40] in str(e.value)
    with pytest.raises(ConfigError, match=r"^data.valid\[0\].name"):
        config_from_dict({"data": {"valid": [{"path": "b.txt", "name": name}]}})


def test_good_dataset_names_and_duplicates():
    names = ["wiki-en_1.0", "a" * 100, "A9", "_x", "-y"]
    cfg = config_from_dict({"data": {"train": [{"path": "x", "name": n} for n in names],
                                     "valid": [{"path": "x", "name": "wiki-en_1.0"}]}})  # same name, other split
    assert [d.name for d in cfg.data.train] == names
    with pytest.raises(ConfigError, match=r"^data.valid\[2\].name: 'web' is already the name of data.valid\[0\]"):
        config_from_dict({"data": {"valid": [{"path": "a", "name": "web"}, "b", {"path": "c", "name": "web"}]}})


# --------------------------------------------------------------------------- the new fields


def test_new_fields_defaults_docs_and_types():
    cfg = config_from_dict({})
    t = cfg.train
    assert (t.allow_foreign_dir, t.max_bad_steps, t.bad_step_window, t.loss_spike_zscore, t.loss_spike_window,
            t.straggler_factor, cfg.data.verify_token_ids) == (False, 5, 100, 0.0, 50, 1.5, "meta")
    docs = {name: doc for name, _, doc in field_docs()}
    for name in ("train.allow_foreign_dir", "train.max_bad_steps", "train.bad_step_window", "train.loss_spike_zscore",
                 "train.loss_spike_window", "train.straggler_factor", "data.verify_token_ids"):
        assert docs[name], name
    cfg = load_config(None, ["train.allow_foreign_dir=true", "data.verify_token_ids=scan", "train.max_bad_steps=0",
                             "train.bad_step_window=0", "train.loss_spike_zscore=3", "train.loss_spike_window=2",
                             "train.straggler_factor=2"])
    assert cfg.train.allow_foreign_dir and cfg.data.verify_token_ids == "scan"
    assert cfg.train.loss_spike_zscore == 3.0 and isinstance(cfg.train.straggler_factor, float)


@pytest.mark.parametrize("tree, pattern", [
    ({"train": {"allow_foreign_dir": "yes please"}}, r"^train.allow_foreign_dir: expected true or false"),
    ({"data": {"verify_token_ids": "full"}}, r"^data.verify_token_ids: expected one of 'meta', 'scan', found 'full'$"),
    ({"train": {"max_bad_steps": -1}}, r"^train.max_bad_steps: expected a non-negative integer, found -1$"),
    ({"train": {"bad_step_window": 0}}, r"^train.bad_step_window: expected a window of at least "
                                        r"train.max_bad_steps=5 steps .*found 0$"),
    ({"train": {"max_bad_steps": 10, "bad_step_window": 9}}, r"^train.bad_step_window: .*found 9$"),
    ({"train": {"loss_spike_zscore": -1}}, r"^train.loss_spike_zscore: expected a finite number >= 0, found -1.0$"),
    ({"train": {"loss_spike_zscore": 3, "loss_spike_window": 1}}, r"^train.loss_spike_window: expected at least 2"),
    ({"train": {"loss_spike_window": -1}}, r"^train.loss_spike_window: expected a non-negative integer"),
    ({"train": {"straggler_factor": 1.0}}, r"^train.straggler_factor: expected a finite number > 1, found 1.0$"),
    ({"train": {"straggler_factor": 0.5}}, r"^train.straggler_factor: expected a finite number > 1"),
])
def test_new_fields_ranges(tree, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(tree)


# --------------------------------------------------------------------------- odd inputs end in ConfigError


@pytest.mark.parametrize("tree, pattern", [
    ({"model": {"preset": ["gpt2"]}}, r"^model.preset: expected null or a preset name \(a string\), found \['gpt2'\]$"),
    ({"model": {"preset": 3}}, r"^model.preset: expected null or a preset name"),
    ({"train": []}, r"^train: expected a mapping of TrainConfig fields, found \[\]$"),
    ({"model": 0}, r"^model: expected a mapping of ModelConfig fields, found 0$"),
    ({"model": {1: 2}}, r"^unknown key 'model.1'"),
    ({"parallel": {"pp_layout": [2 ** 80]}}, r"^parallel.pp_layout: expected list\[int\] \| null"),
    ({"data": {"split": "inf,1,0"}}, r"^data.split: expected three finite non-negative proportions"),
])
def test_odd_values_give_config_errors(tree, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(tree)
    with pytest.raises(ConfigError, match=r"^config: expected a mapping of sections"):
        config_from_dict([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize("override, pattern", [
    ("train.out_dir=0x_", r"^override 'train.out_dir=0x_': value '0x_': a value cannot be read"),
    ("train.iters=0b_", r"a value cannot be read"),
    ("train.iters=[1, 2", r"is not valid YAML: "),
    ("train.out_dir=\x1b", r"is not valid YAML: .*special characters are not allowed"),
    ("train.iters=" + "9" * 5000, r"a value cannot be read"),
])
def test_unreadable_override_values(override, pattern):
    with pytest.raises(ConfigError, match=pattern) as e:
        load_config(None, [override])
    assert "\n" not in str(e.value)


def test_override_into_an_empty_section_and_unreadable_files(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\noptim:\n")
    assert load_config(path, ["train.iters=7"]).train.iters == 7
    (tmp_path / "bin.yaml").write_bytes(b"train: {iters: 3}\n\xff\xfe\n")
    with pytest.raises(ConfigError, match=r"bin.yaml': expected UTF-8 text"):
        load_config(tmp_path / "bin.yaml")
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(tmp_path)  # a directory
