"""Hugging Face <-> Tessera conversion (docs/conversion.md): config mapping, tensor mapping, streamed files,
from-hf / to-hf, and --verify against transformers."""
