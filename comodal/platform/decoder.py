"""The sequence-to-sequence SLU decoder (DESIGN.md, "Sequence-to-sequence SLU"): a pre-norm
Transformer decoder over pooled audio frames, trained with teacher forcing and decoded greedily
or by beam search batched over utterances and beams together."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from comodal.errors import ConfigError, DataError
from comodal.platform.sequences import EOS, PAD, SOS


def sinusoidal_positions(length: int, dim: int, device: torch.device | None = None) -> Tensor:
    """Vaswani et al. (2017) positions [length, dim]: sin(p ω_i) at feature 2i, cos(p ω_i) at
    2i + 1, with ω_i = 10000^(-2i / dim)."""
    position = torch.arange(length, dtype=torch.float32, device=device).unsqueeze(1)
    omega = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device)
                      * (-math.log(10000.0) / dim))
    table = torch.empty(length, dim, device=device)
    table[:, 0::2] = torch.sin(position * omega)
    table[:, 1::2] = torch.cos(position * omega)
    return table


def pool_frames(frames: Tensor, valid: Tensor, stride: int) -> tuple[Tensor, Tensor]:
    """Average of the valid frames [B, T, D] in each window of ``stride`` frames (the last one
    may be short) -> ([B, ceil(T / stride), D], [B, ceil(T / stride)] True where a window holds
    a valid frame). Invalid frames count for nothing, so padding never changes a window."""
    batch, length, width = frames.shape
    extra = -length % stride
    kept = F.pad(frames.masked_fill(~valid.unsqueeze(-1), 0), (0, 0, 0, extra))
    counts = F.pad(valid.to(frames.dtype), (0, extra)).view(batch, -1, stride).sum(2)
    sums = kept.view(batch, -1, stride, width).sum(2)
    return sums / counts.clamp(min=1).unsqueeze(-1), counts > 0


def decoding_log_probs(logits: Tensor) -> Tensor:
    """Log-softmax over the tokens decoding may emit: PAD (the filler after EOS) and SOS (only
    ever the first token) are excluded, so a decoded row always reads SOS t1 ... EOS PAD ..."""
    return logits.index_fill(-1, torch.tensor([PAD, SOS], device=logits.device),
                             -math.inf).log_softmax(-1)


def gnmt_score(log_prob: Tensor, length: Tensor | int, alpha: float) -> Tensor:
    """A finished hypothesis's score (Wu et al. 2016, GNMT): log p / ((5 + L) / 6)^alpha with L
    the generated tokens, EOS included."""
    return log_prob / ((5 + torch.as_tensor(length, dtype=log_prob.dtype)) / 6) ** alpha


class SequenceDecoder(nn.Module):
    """Transformer decoder (pre-norm, final LayerNorm) from audio frames to token ids.

    Memory: the encoder's frames [B, T, memory_dim] averaged over windows of ``frame_stride``
    valid frames, a Linear to ``dim``, plus sinusoidal positions (conv frames carry none).
    Tokens: embedding x sqrt(dim) + sinusoidal positions (a table for ``max_length`` tokens);
    a causal mask, a key padding mask where inputs == PAD, and one on the memory's windows.
    """

    def __init__(self, memory_dim: int, vocab_size: int, dim: int = 128, layers: int = 2,
                 heads: int = 4, ffn: int = 512, dropout: float = 0.1, max_length: int = 64,
                 frame_stride: int = 1) -> None:
        super().__init__()
        _check_config(memory_dim=memory_dim, vocab_size=vocab_size, dim=dim, layers=layers,
                      heads=heads, ffn=ffn, dropout=dropout, max_length=max_length,
                      frame_stride=frame_stride)
        self.dim, self.max_length, self.frame_stride = dim, max_length, frame_stride
        self.frames_in = nn.Linear(memory_dim, dim)
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=PAD)
        # entries of std 1 once scaled by sqrt(dim), the positions' scale (fairseq's init); the
        # default N(0, 1) would drown the positions (a copy task then learns several times slower)
        nn.init.normal_(self.embedding.weight, std=dim ** -0.5)
        with torch.no_grad():
            self.embedding.weight[PAD] = 0
        self.register_buffer("positions", sinusoidal_positions(max_length, dim),
                             persistent=False)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerDecoderLayer(dim, heads, ffn, dropout, batch_first=True,
                                           norm_first=True)
        self.layers = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(dim))
        self.output = nn.Linear(dim, vocab_size)

    def memory(self, frames: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """frames [B, T, memory_dim], valid [B, T] (True = real frame) -> the decoder's memory
        [B, T', dim] and its valid windows [B, T'], T' = ceil(T / frame_stride)."""
        if frames.dim() != 3 or frames.shape[-1] != self.frames_in.in_features:
            raise DataError(f"decoder frames have shape {tuple(frames.shape)}; expected "
                            f"[batch, frames, {self.frames_in.in_features}]")
        if valid.shape != frames.shape[:2]:
            raise DataError(f"decoder frame mask has shape {tuple(valid.shape)}; expected "
                            f"{tuple(frames.shape[:2])}, the frames' [batch, frames]")
        if not bool(valid.any(1).all()):  # its cross-attention would have no key at all
            raise DataError("an utterance has no valid frame for the decoder (a row of the "
                            "frame mask is all False)")
        pooled, windows = pool_frames(frames, valid, self.frame_stride)
        positions = sinusoidal_positions(pooled.shape[1], self.dim, frames.device)
        return self.frames_in(pooled) + positions, windows

    def forward(self, memory: Tensor, memory_valid: Tensor, inputs: Tensor) -> Tensor:
        """inputs [B, L] token ids, SOS first and PAD after the end -> logits [B, L, V]."""
        return self.output(self._states(memory, memory_valid, inputs))

    def token_embeddings(self, tokens: Tensor) -> Tensor:
        """The embedding rows of ``tokens`` (no scale, no positions): COCONUT's text side."""
        return self.embedding(tokens)

    @staticmethod
    def loss(logits: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy of logits [B, L, V] against targets [B, L], mean over non-PAD targets."""
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=PAD)

    def teacher_forced(self, memory: Tensor, memory_valid: Tensor,
                       tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing on tokens [B, L] (SOS ... EOS PAD ...): the logits of inputs
        tokens[:, :-1] and their loss against targets tokens[:, 1:]."""
        logits = self(memory, memory_valid, tokens[:, :-1])
        return logits, self.loss(logits, tokens[:, 1:])

    @torch.no_grad()
    def greedy(self, memory: Tensor, memory_valid: Tensor, max_length: int) -> Tensor:
        """The most likely next token each step -> [B, L'] rows SOS t1 ... EOS PAD ..., at most
        ``max_length`` tokens (a row cut there has no EOS). Finished rows are not recomputed."""
        self._check_decoding(1, max_length)
        batch = memory.shape[0]
        tokens = torch.full((batch, 1), SOS, dtype=torch.long, device=memory.device)
        live = torch.ones(batch, dtype=torch.bool, device=memory.device)
        rows = live.nonzero().squeeze(1)
        active = memory, memory_valid
        for _ in range(max_length - 1):
            step = torch.full((batch,), PAD, dtype=torch.long, device=memory.device)
            step[rows] = decoding_log_probs(self._next_logits(*active, tokens[rows])).argmax(1)
            tokens = torch.cat([tokens, step.unsqueeze(1)], 1)
            live &= step != EOS
            if not bool(live.any()):
                break
            if not bool(live[rows].all()):
                rows = live.nonzero().squeeze(1)
                active = memory[rows], memory_valid[rows]
        return tokens

    @torch.no_grad()
    def beam_search(self, memory: Tensor, memory_valid: Tensor, width: int, max_length: int,
                    length_penalty: float = 0.6) -> Tensor:
        """Beam search over all utterances at once (B x width rows per decoder call) -> each
        utterance's best finished hypothesis, [B, L'] as ``greedy`` returns them.

        Live beams rank by summed log-probability; a candidate among the best ``width`` that
        emits EOS is finished with ``gnmt_score``. An utterance is done (its rows no longer
        computed) once it has ``width`` finished hypotheses; at ``max_length`` its live beams
        count as finished. The first step expands one beam only, so beams are distinct.
        """
        self._check_decoding(width, max_length)
        batch, device = memory.shape[0], memory.device
        memory = memory.repeat_interleave(width, 0)
        memory_valid = memory_valid.repeat_interleave(width, 0)
        tokens = torch.full((batch * width, 1), SOS, dtype=torch.long, device=device)
        scores = torch.full((batch, width), -math.inf, device=device)
        scores[:, 0] = 0
        finished = _Finished(batch, width, max_length, device)
        items = torch.arange(batch, device=device)
        rows = torch.arange(batch * width, device=device)
        active = memory, memory_valid
        for length in range(1, max_length):  # tokens generated after this step, EOS included
            prefixes = tokens[rows]
            logp = decoding_log_probs(self._next_logits(*active, prefixes))
            prefixes = prefixes.view(len(items), width, length)
            candidates = scores[items].unsqueeze(2) + logp.view(len(items), width, -1)
            top, index = candidates.flatten(1).topk(2 * width, dim=1)
            source, token = index // logp.shape[1], index % logp.shape[1]
            ended = (token[:, :width] == EOS) & top[:, :width].isfinite()
            finished.add(items, torch.where(ended, gnmt_score(top[:, :width], length,
                                                              length_penalty), -math.inf),
                         _extend(prefixes, source[:, :width], token[:, :width]))
            # the best `width` that go on: at most `width` of the 2 x width end (one per beam)
            order = (token == EOS).to(torch.int8).argsort(dim=1, stable=True)[:, :width]
            scores[items] = top.gather(1, order)
            tokens = torch.cat([tokens, tokens.new_full((len(tokens), 1), PAD)], 1)
            tokens[rows] = _extend(prefixes, source.gather(1, order),
                                   token.gather(1, order)).flatten(0, 1)
            done = finished.count(items) >= width
            if bool(done.all()):
                break
            if bool(done.any()):
                items = items[~done]
                rows = (items.unsqueeze(1) * width + torch.arange(width, device=device)).flatten()
                active = memory[rows], memory_valid[rows]
        else:  # max_length reached: the live beams of the items left count as finished
            finished.add(items, gnmt_score(scores[items], max_length - 1, length_penalty),
                         tokens[rows].view(len(items), width, max_length))
        return finished.best()

    def decode(self, memory: Tensor, memory_valid: Tensor, width: int, max_length: int,
               length_penalty: float = 0.6) -> Tensor:
        """Greedy decoding when ``width`` is 1, beam search otherwise."""
        if width == 1:
            return self.greedy(memory, memory_valid, max_length)
        return self.beam_search(memory, memory_valid, width, max_length, length_penalty)

    def _states(self, memory: Tensor, memory_valid: Tensor, inputs: Tensor) -> Tensor:
        """The final LayerNorm's output [B, L, dim] for inputs [B, L]."""
        length = inputs.shape[1]
        if length > self.max_length:
            raise DataError(f"decoder inputs have {length} tokens; the decoder's max_length is "
                            f"{self.max_length}")
        x = self.embedding(inputs) * math.sqrt(self.dim) + self.positions[:length]
        causal = torch.ones(length, length, dtype=torch.bool, device=inputs.device).triu(1)
        return self.layers(self.dropout(x), memory, tgt_mask=causal, tgt_is_causal=True,
                           tgt_key_padding_mask=inputs == PAD,
                           memory_key_padding_mask=~memory_valid)

    def _next_logits(self, memory: Tensor, memory_valid: Tensor, prefixes: Tensor) -> Tensor:
        """The next token's logits [N, V] after each prefix [N, L] (no PAD in a prefix)."""
        return self.output(self._states(memory, memory_valid, prefixes)[:, -1])

    def _check_decoding(self, width: int, max_length: int) -> None:
        if width < 1:
            raise ConfigError(f"beam width {width} is not valid; it must be 1 (greedy) or more")
        if not 2 <= max_length <= self.max_length:
            raise ConfigError(f"decoding max_length {max_length} is not valid; it must be from "
                              f"2 to the decoder's max_length {self.max_length}")


def _extend(prefixes: Tensor, source: Tensor, token: Tensor) -> Tensor:
    """Per item, the prefixes [A, W, L] picked by ``source`` [A, K] with ``token`` [A, K]
    appended -> [A, K, L + 1]."""
    picked = prefixes.gather(1, source.unsqueeze(2).expand(-1, -1, prefixes.shape[2]))
    return torch.cat([picked, token.unsqueeze(2)], 2)


class _Finished:
    """The best ``width`` finished hypotheses of each item: scores [B, W] (-inf = none yet)
    and tokens [B, W, max_length], PAD after the end."""

    def __init__(self, batch: int, width: int, max_length: int, device: torch.device) -> None:
        self.scores = torch.full((batch, width), -math.inf, device=device)
        self.tokens = torch.full((batch, width, max_length), PAD, dtype=torch.long,
                                 device=device)

    def add(self, items: Tensor, scores: Tensor, tokens: Tensor) -> None:
        """Merge candidates scores [A, K] (-inf = not finished), tokens [A, K, L] of ``items``."""
        width, max_length = self.tokens.shape[1:]
        tokens = F.pad(tokens, (0, max_length - tokens.shape[2]), value=PAD)
        kept, pick = torch.cat([self.scores[items], scores], 1).topk(width, dim=1)
        pool = torch.cat([self.tokens[items], tokens], 1)
        self.scores[items] = kept
        self.tokens[items] = pool.gather(1, pick.unsqueeze(2).expand(-1, -1, max_length))

    def count(self, items: Tensor) -> Tensor:
        return self.scores[items].isfinite().sum(1)

    def best(self) -> Tensor:
        """Each item's best hypothesis [B, L'], L' the longest of them."""
        best = self.tokens[torch.arange(len(self.tokens)), self.scores.argmax(1)]
        return best[:, : int((best != PAD).sum(1).max())]


def _check_config(**values: float) -> None:
    """ConfigError naming the first setting out of its range."""
    minimum = {"memory_dim": 1, "vocab_size": EOS + 2, "dim": 2, "layers": 1, "heads": 1,
               "ffn": 1, "max_length": 2, "frame_stride": 1}
    for name, low in minimum.items():
        if values[name] < low:
            raise ConfigError(f"decoder {name} {values[name]} is not valid; it must be at "
                              f"least {low}")
    if not 0 <= values["dropout"] < 1:
        raise ConfigError(f"decoder dropout {values['dropout']} is not valid; it must be in "
                          "[0, 1)")
    if values["dim"] % 2 or values["dim"] % values["heads"]:
        raise ConfigError(f"decoder dim {values['dim']} is not valid with heads "
                          f"{values['heads']}: it must be even and divisible by heads")
