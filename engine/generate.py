"""Sample text from a trained run or a checkpoint (temperature / top-k)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from engine.checkpoint.export import ModelCheckpoint, is_checkpoint_path
from engine.checkpoint.weights import load_weights
from engine.config import Config, ConfigError, load_config
from engine.errors import RunDirError, TesseraError
from engine.data import Tokenizer, build_tokenizer
from engine.model.transformer import Transformer


def _empty_model(cfg: Config, device: str) -> Transformer:
    """A one-process model with uninitialised weights (the real vocabulary is padded here)."""
    model = Transformer(cfg.model, device="meta")
    model.to_empty(device=torch.device(device))
    model.reset_buffers()
    return model


def load_run(run_dir: str | Path, device: str = "cpu") -> tuple[Config, Transformer, Tokenizer]:
    """Config, model with the final weights, and its tokenizer -- of a run directory (config.yaml and
    model.safetensors, written at the end of `tessera train` or by `tessera checkpoint export`), or of a
    checkpoint (a step-NNNNNNN/ directory, or a checkpoint root = the one its `latest` names): its config
    and `model/` tensors are read straight from the shards, whatever layout saved them, with no export."""
    run = Path(run_dir)
    cfg_path, weights = run / "config.yaml", run / "model.safetensors"
    if not (cfg_path.is_file() and weights.is_file()) and is_checkpoint_path(run):
        ck = ModelCheckpoint.open(run, "checkpoint")
        _check_decoder(ck.config, run)
        model = _empty_model(ck.config, device)
        ck.load_into(model)
        model.eval()
        return ck.config, model, build_tokenizer(ck.config.data.tokenizer)
    for f in (cfg_path, weights):
        if not f.is_file():
            raise RunDirError(f"run directory {str(run)!r}: expected {f.name} (written at the end of "
                              f"`tessera train`), found none{_checkpoint_hint(cfg_path)}")
    cfg = load_config(cfg_path)
    _check_decoder(cfg, run)
    # Canonical weights (real vocabulary) into a one-process model; the vocabulary padding is added here.
    model = _empty_model(cfg, device)
    load_weights(model, weights)
    model.eval()
    return cfg, model, build_tokenizer(cfg.data.tokenizer)


def _check_decoder(cfg: Config, run: Path) -> None:
    """Before any weight is read: an encoder predicts masked positions and cannot generate left to right."""
    if cfg.model.encoder:
        raise ConfigError(f"generate: {str(run)!r} holds an encoder (model.encoder=true, trained with "
                          f"train.objective={cfg.train.objective}): it predicts masked positions and cannot generate "
                          f"text left to right; expected a decoder's run or checkpoint")


def _checkpoint_hint(cfg_path: Path) -> str:
    """A run stopped before its end (no model.safetensors) may have checkpoints: say where, if it does."""
    if not cfg_path.is_file():
        return " (or give a checkpoint: a step-NNNNNNN/ directory or a checkpoint root)"
    try:
        ck_dir = load_config(cfg_path).checkpoint.dir
    except TesseraError:  # only a hint: the error that matters is the one being raised
        return ""
    if ck_dir and is_checkpoint_path(ck_dir):
        return f"; its checkpoints are in {ck_dir!r}: `tessera generate {ck_dir}` samples from the latest"
    return ""


@torch.no_grad()
def generate_ids(model: Transformer, ids: list[int], max_new_tokens: int, temperature: float = 0.8,
                 top_k: Optional[int] = 40, seed: Optional[int] = None, device: str | torch.device = "cpu",
                 stop_id: Optional[int] = None) -> list[int]:
    """The prompt `ids` followed by up to max_new_tokens sampled tokens.

    temperature <= 0 is greedy (argmax); top_k samples from the k most likely tokens only (None or 0: all);
    sampling a stop_id ends generation without appending it. The model sees at most its last
    cfg.max_seq_len tokens, and only the real vocabulary (padded logit columns are never sampled).
    """
    if not ids:
        raise ValueError("generate: expected at least one prompt token, found none")
    if top_k is not None and top_k < 0:
        raise ValueError(f"generate: top_k must be >= 0 (0 = all tokens), found {top_k}")
    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(seed)
    else:  # a new Generator always starts from the same default seed: without this every run samples alike
        gen.seed()
    was_training = model.training
    model.eval()
    try:
        x = torch.tensor([ids], dtype=torch.long, device=device)
        for _ in range(max_new_tokens):
            ctx = x[:, -model.cfg.max_seq_len:]
            logits = model(ctx)[0, -1, :model.vocab_size].float().cpu()  # padded vocab never sampled
            nxt = sample_next(logits, temperature, top_k, gen)
            if stop_id is not None and nxt == stop_id:
                break
            x = torch.cat([x, torch.tensor([[nxt]], dtype=torch.long, device=device)], dim=1)
    finally:
        model.train(was_training)
    return x[0].tolist()


def sample_next(logits: torch.Tensor, temperature: float, top_k: Optional[int], gen: torch.Generator) -> int:
    """One token id from logits [V] (see generate_ids for the meaning of temperature and top_k)."""
    if temperature <= 0:
        return int(logits.argmax())
    if top_k and top_k < logits.numel():
        # exactly k candidates by index: masking `logits < kth value` would keep every token tied with the
        # k-th and so sample from more than k
        keep = torch.topk(logits, top_k).indices
        logits = torch.full_like(logits, float("-inf")).index_copy(0, keep, logits[keep])
    # subtract the max before dividing: a tiny temperature then sends the others to -inf (probability 0)
    # instead of overflowing to inf and NaN, so temperature -> 0 tends to greedy
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


def generate_text(model: Transformer, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 200,
                  temperature: float = 0.8, top_k: Optional[int] = 40, seed: Optional[int] = None,
                  device: str | torch.device = "cpu") -> str:
    ids = tokenizer.encode(prompt)
    if not ids:
        ids = [tokenizer.eod_id]
    out = generate_ids(model, ids, max_new_tokens, temperature, top_k, seed, device, stop_id=tokenizer.eod_id)
    return tokenizer.decode(out)
