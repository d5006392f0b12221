"""Document-masking features of one sample: position ids that restart after every EOD, and document ids."""

from __future__ import annotations

import torch


def document_features(tokens: torch.Tensor, eod_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens: LongTensor [seq_len+1] -> (position_ids [seq_len], doc_ids [seq_len]) for the input tokens[:-1].

    The EOD token belongs to the document it ends; the token after it starts a new document at position 0.
    doc_ids count the EODs strictly before each position, so attention may only look within equal doc_ids.
    """
    inp = tokens[:-1]                                           # [S]
    is_eod = (inp == eod_id).long()                             # [S]
    doc_ids = torch.cumsum(is_eod, 0) - is_eod                  # [S] EODs before position i
    idx = torch.arange(inp.numel(), dtype=torch.long)           # [S]
    # start of each document = index after the previous EOD; cummax carries it forward.
    starts = torch.where(is_eod.bool(), idx + 1, torch.zeros_like(idx))
    starts = torch.cat([torch.zeros(1, dtype=torch.long), starts[:-1]])
    starts = torch.cummax(starts, 0).values                     # [S]
    return idx - starts, doc_ids
