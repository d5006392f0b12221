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
    ({"train": {"compile": True}, "parallel": {"pp": 2}}, r"train.compile=true is not supported with parallel.pp > 1"),
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
