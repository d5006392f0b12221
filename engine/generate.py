"""Sample text from a trained run (temperature / top-k)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from engine.config import Config, ConfigError, load_config
from engine.data import Tokenizer, build_tokenizer
from engine.model.transformer import Transformer


def load_run(run_dir: str | Path, device: str = "cpu") -> tuple[Config, Transformer, Tokenizer]:
    """Config, model with the run's final weights, and its tokenizer."""
    run = Path(run_dir)
    cfg_path, weights = run / "config.yaml", run / "model.safetensors"
    for f in (cfg_path, weights):
        if not f.is_file():
            raise ConfigError(f"run directory {str(run)!r}: expected {f.name} (written at the end of "
                              f"`tessera train`), found none")
    cfg = load_config(cfg_path)
    from safetensors.torch import load_file

    model = Transformer(cfg.model)
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{weights}: weights do not match the model in {cfg_path}: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    model.to(device).eval()
    return cfg, model, build_tokenizer(cfg.data.tokenizer)


@torch.no_grad()
def generate_ids(model: Transformer, ids: list[int], max_new_tokens: int, temperature: float = 0.8,
                 top_k: Optional[int] = 40, seed: Optional[int] = None, device: str | torch.device = "cpu",
                 stop_id: Optional[int] = None) -> list[int]:
    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(seed)
    was_training = model.training
    model.eval()
    x = torch.tensor([ids], dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        ctx = x[:, -model.cfg.max_seq_len:]
        logits = model(ctx)[0, -1, :model.vocab_size].float().cpu()  # padded vocab never sampled
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        if stop_id is not None and nxt == stop_id:
            break
        x = torch.cat([x, torch.tensor([[nxt]], device=device)], dim=1)
    model.train(was_training)
    return x[0].tolist()


def generate_text(model: Transformer, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 200,
                  temperature: float = 0.8, top_k: Optional[int] = 40, seed: Optional[int] = None,
                  device: str | torch.device = "cpu") -> str:
    ids = tokenizer.encode(prompt)
    if not ids:
        ids = [tokenizer.eod_id]
    out = generate_ids(model, ids, max_new_tokens, temperature, top_k, seed, device, stop_id=tokenizer.eod_id)
    return tokenizer.decode(out)
