"""Sequence-to-sequence SLU targets (``comodal.scenarios.slu_targets`` writes them) parsed back
into their fields, and the BPE tokenizer that turns them into decoder ids."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from comodal.core.data import MultimodalDataset
from comodal.errors import ConfigError, DataError
from comodal.scenarios.slu_targets import FILL, SEP

SPECIALS = ("[PAD]", "[UNK]", "[SOS]", "[EOS]")
PAD, UNK, SOS, EOS = 0, 1, 2, 3

# every character a normalized ASCII target can hold, so that any such target round-trips
# whatever the training targets were; "\u2581" is Metaspace's word-start marker
_ALPHABET = "".join(sorted(set("abcdefghijklmnopqrstuvwxyz0123456789'" + SEP + FILL + "\u2581")))


@dataclass
class ParsedTarget:
    """The fields of a (decoded) target: intent, ``(type, value)`` slots and transcription."""

    intent: str
    slots: list[tuple[str, str]]
    text: str


def _field(text: str) -> str:
    return " ".join(text.split())


def parse_target(text: str) -> ParsedTarget:
    """Split any string, a decoded one possibly malformed, into a target's fields: the intent
    before the first ``_SEP``, the ``type _FILL value`` fields between (others ignored) and the
    text after the last ``_SEP``; a string without ``_SEP`` has an empty intent and text."""
    fields = text.split(SEP)
    if len(fields) == 1:
        return ParsedTarget("", [], "")
    slots = []
    for middle in fields[1:-1]:
        kind, fill, value = middle.partition(FILL)
        if fill:
            slots.append((_field(kind), _field(value)))
    return ParsedTarget(_field(fields[0]), slots, _field(fields[-1]))


class SequenceTokenizer:
    """HF `tokenizers` BPE, specials [PAD]=0 [UNK]=1 [SOS]=2 [EOS]=3; exact round trip.

    Words split at spaces (Metaspace: the papers' whitespace pre-tokenizer with each word's
    start marked, so decoding restores the spaces exactly). The base alphabet holds every
    character of a normalized ASCII target besides the training targets' own, so any such
    target decodes to itself; a character outside both encodes as [UNK] and is dropped."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int) -> SequenceTokenizer:
        """Learn the BPE merges of ``texts`` (the training targets) up to ``vocab_size``
        tokens; deterministic, the same texts give the same JSON."""
        if isinstance(texts, str) or not texts:
            raise DataError(f"tokenizer training needs a list of target strings, got {texts!r}")
        needed = len(SPECIALS) + len(set(_ALPHABET) | set("".join(texts).replace(" ", "\u2581")))
        if vocab_size < needed:
            raise ConfigError(f"model.decoder.vocab_size: {vocab_size} cannot hold the 4 "
                              f"specials and the targets' characters; use at least {needed}")
        tokenizer = Tokenizer(models.BPE(unk_token=SPECIALS[UNK]))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                      initial_alphabet=list(_ALPHABET), show_progress=False)
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer)

    @classmethod
    def from_json(cls, text: str) -> SequenceTokenizer:
        """The tokenizer ``to_json`` wrote (as a checkpoint stores it)."""
        try:
            tokenizer = Tokenizer.from_str(text)
        except Exception as error:  # tokenizers raises a bare Exception on bad JSON
            raise DataError(f"not a tokenizer's JSON: {error}") from None
        found = tuple(tokenizer.id_to_token(i) for i in range(len(SPECIALS)))
        if found != SPECIALS:
            raise DataError(f"tokenizer JSON has specials {found} at ids 0..3, not {SPECIALS}")
        return cls(tokenizer)

    def to_json(self) -> str:
        """The whole tokenizer (merges, specials, pre-tokenizer) as HF tokenizers' JSON."""
        return self.tokenizer.to_str()

    @property
    def vocab_size(self) -> int:
        """The trained vocabulary's size, specials included (at most the requested one)."""
        return self.tokenizer.get_vocab_size()

    def digest(self) -> str:
        """A short sha256 of the JSON, naming this vocabulary in a run's metrics.json."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def encode(self, texts: Sequence[str], max_length: int) -> torch.Tensor:
        """LongTensor [N, L]: per row [SOS], the tokens, [EOS], then [PAD] up to the longest
        row. A row of more than ``max_length`` ids is refused rather than cut, since a cut
        target teaches the decoder never to stop."""
        if isinstance(texts, str):
            raise DataError(f"encode takes a list of targets, got the string {texts!r}")
        rows = [[SOS, *e.ids, EOS]
                for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]
        for text, row in zip(texts, rows, strict=True):
            if len(row) > max_length:
                raise DataError(f"target {text!r} is {len(row)} tokens with [SOS] and [EOS], "
                                f"over model.decoder.max_length={max_length}")
        width = max((len(r) for r in rows), default=0)
        return torch.tensor([r + [PAD] * (width - len(r)) for r in rows],
                            dtype=torch.long).reshape(len(rows), width)

    def decode(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Each row's text: a leading [SOS] dropped, cut at the first [EOS] or [PAD], other
        specials skipped; a normalized target comes back exactly as it was encoded."""
        rows = ids.tolist() if isinstance(ids, torch.Tensor) else [[int(t) for t in r] for r in ids]
        kept = []
        for row in rows:
            row = row[1:] if row[:1] == [SOS] else row
            stop = next((i for i, t in enumerate(row) if t in (EOS, PAD)), len(row))
            kept.append([t for t in row[:stop] if t >= len(SPECIALS)])
        return self.tokenizer.decode_batch(kept)

    def transcript_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, L]``: True at the tokens of each row's transcription, those after the row's
        last ``_SEP`` and before its ``[EOS]`` (COCONUT pools their embeddings). Words are
        tokenised one by one, so ``_SEP`` is the same ids wherever it stands; a row without it
        (a decoded one) counts every token after ``[SOS]``."""
        sep = torch.tensor(self.tokenizer.encode(SEP, add_special_tokens=False).ids,
                           device=tokens.device)
        width = tokens.shape[1]
        position = torch.arange(width, device=tokens.device).expand_as(tokens)
        hits = (tokens.unfold(1, len(sep), 1) == sep).all(-1)  # [B, L - len(sep) + 1]
        ends = torch.arange(len(sep), hits.shape[1] + len(sep), device=tokens.device)
        start = torch.where(hits, ends, 1).amax(1, keepdim=True)  # after the last _SEP
        stop = torch.where((tokens == EOS) | (tokens == PAD), position, width).amin(1, True)
        return (position >= start) & (position < stop)


def target_tokens(tokenizer: SequenceTokenizer,
                  groups: Sequence[Sequence[MultimodalDataset]],
                  max_length: int) -> list[list[torch.Tensor]]:
    """Each dataset's ``meta["target"]`` as token ids, all padded to the longest row of any,
    so that rows of any datasets can share a batch (replay, joint training)."""
    encoded = [[tokenizer.encode(data.meta["target"], max_length) for data in group]
               for group in groups]
    width = max(ids.shape[1] for group in encoded for ids in group)
    return [[F.pad(ids, (0, width - ids.shape[1]), value=PAD) for ids in group]
            for group in encoded]
