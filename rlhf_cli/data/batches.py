"""Batches: padding, packing examples into rows (best-fit decreasing), and the collators."""

from __future__ import annotations

from typing import NotRequired, TypedDict

import torch

from rlhf_cli.data.examples import PreferenceExample, SFTExample
from rlhf_cli.losses import IGNORE_INDEX

# ---------------------------------------------------------------------------------------------
# batches


class SFTBatch(TypedDict):
    input_ids: torch.Tensor  # (B, T) long, right-padded to the longest row of the batch
    attention_mask: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long, IGNORE_INDEX on prompt and padding


def pad(seqs: list[list[int]], value: int, left: bool = False, multiple: int = 1) -> torch.Tensor:
    """(len(seqs), width) padded on the right, or on the left with `left`: width = the longest
    row rounded up to a multiple of `multiple`."""
    width = -(-max(len(s) for s in seqs) // multiple) * multiple
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        start = width - len(s) if left else 0
        out[i, start : start + len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins whose lengths sum to at most `capacity`: longest
    first, each into the bin it fills the most (the one with the least room that still fits),
    else a new bin; an item longer than `capacity` gets a bin of its own. Ties go by index, so
    the layout is a function of the lengths alone. Each bin lists its items in placing order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (room[b], b))
            bins[b].append(i)
            room[b] -= lengths[i]
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def pack_bins(lengths: list[int], limit: int, multiple: int = 1) -> list[list[int]]:
    """The rows to pack items of `lengths` into, rows of at most `limit` tokens (an item
    longer than that: a row of its own): best_fit_decreasing at the row length, among those
    that make 1, 2, ... n rows of the total, that leaves the fewest positions (rows x the
    longest row rounded up to `multiple`); ties: the shorter rows. A batch is as wide as its
    longest row, so a few examples packed at `limit` would pad their one sparse row to it;
    at n rows the length is the longest item's, so packing never pads more than padding does."""
    longest, total = max(lengths), sum(lengths)
    best: tuple[tuple[int, int], list[list[int]]] | None = None
    for r in range(1, len(lengths) + 1):
        cap = max(longest, min(-(-total // r), limit))
        bins = best_fit_decreasing(lengths, cap)
        width = -(-max(sum(lengths[i] for i in b) for b in bins) // multiple) * multiple
        key = (len(bins) * width, width)
        if best is None or key < best[0]:
            best = (key, bins)
    assert best is not None
    return best[1]


class PackedRows(TypedDict):
    """Sequences packed several to a row: no attention mask (the model finds each sequence's
    bounds in the position ids, which restart at 0 where a sequence starts: a block-diagonal
    causal mask, or flash-attention's variable-length kernel)."""

    input_ids: torch.Tensor  # (R, T) sequences end to end, then padding
    labels: torch.Tensor  # (R, T) IGNORE_INDEX on each sequence's first token and padding
    position_ids: torch.Tensor  # (R, T) 0, 1, ... within each sequence (padding: its own run)
    sequence: torch.Tensor  # (R, T) the sequence (logical row) of each position; -1 on padding
    last: torch.Tensor  # (N,) the flat position (r * T + t) of each sequence's last token


def pack_rows(
    seqs: list[list[int]],
    labels: list[list[int]],
    rows: list[list[int]],
    pad_id: int,
    multiple: int = 1,
) -> PackedRows:
    """Sequences (logical rows) placed end to end into physical rows: `rows[r]` lists the
    sequences of row r. The width is the longest row rounded up to `multiple`. Each sequence's
    first label is dropped (IGNORE_INDEX): unpacked, nothing precedes it, so it is never
    predicted; packed, the previous sequence's last token would predict it."""
    width = -(-max(sum(len(seqs[j]) for j in row) for row in rows) // multiple) * multiple
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labs = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    sequence = torch.full((len(rows), width), -1, dtype=torch.long)
    last = torch.zeros(len(seqs), dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for j in row:
            n = len(seqs[j])
            ids[r, t : t + n] = torch.tensor(seqs[j], dtype=torch.long)
            labs[r, t + 1 : t + n] = torch.tensor(labels[j][1:], dtype=torch.long)
            positions[r, t : t + n] = torch.arange(n)
            sequence[r, t : t + n] = j
            last[j] = r * width + t + n - 1
            t += n
        positions[r, t:] = torch.arange(width - t)
    return PackedRows(
        input_ids=ids, labels=labs, position_ids=positions, sequence=sequence, last=last
    )


def is_packed(batch: dict) -> bool:
    return "sequence" in batch


def example_length(ex: dict) -> int:
    """The tokens an example puts through the model: its sequence (sft), its prompt with each
    response (preference, unpaired) or its prompt (online stages)."""
    if "input_ids" in ex:
        return len(ex["input_ids"])
    responses = ex.get("responses_ids") or [[]]
    return sum(len(ex["prompt_ids"]) + len(r) for r in responses)


def row_count(batch: dict) -> int:
    """The rows (responses) of a preference batch, packed or not."""
    return int((batch["index"] >= 0).sum())


def real_tokens(batch: dict) -> int:
    """Tokens of a batch that are not padding, packed or not."""
    if is_packed(batch):
        return int((batch["sequence"] >= 0).sum())
    return int(batch["attention_mask"].sum())


def collate_sft(
    examples: list[SFTExample],
    pad_id: int,
    multiple: int = 1,
    pack: int | None = None,
    slices: bool = False,
) -> SFTBatch | PackedRows:
    """Right-padded to the longest row rounded up to `multiple` (train.pad_to_multiple_of).
    With `pack` (train.packing: data.max_length), the examples are packed into rows of at most
    `pack` tokens (pack_bins; pack_rows), run as one forward (model.forward.packed_states) or, with
    `slices`, one forward per example."""
    ids = [ex["input_ids"] for ex in examples]
    if pack:
        rows = pack_bins([len(s) for s in ids], pack, multiple)
        packed = pack_rows(ids, [ex["labels"] for ex in examples], rows, pad_id, multiple)
        return {**packed, "slices": slices}  # type: ignore[typeddict-item]
    return SFTBatch(
        input_ids=pad(ids, pad_id, multiple=multiple),
        attention_mask=pad([[1] * len(s) for s in ids], 0, multiple=multiple),
        labels=pad([ex["labels"] for ex in examples], IGNORE_INDEX, multiple=multiple),
    )


class PreferenceBatch(TypedDict):
    """B examples with up to K responses each, as N = sum(K_b) concatenated rows, so chosen and
    rejected (and any further ranks) go through ONE forward."""

    input_ids: torch.Tensor  # (N, T) prompt + response, right-padded
    attention_mask: torch.Tensor  # (N, T)
    labels: torch.Tensor  # (N, T): response tokens; IGNORE_INDEX on prompt and padding
    index: torch.Tensor  # (B, K) row of each (example, rank) in the N rows; -1 where absent
    margin: torch.Tensor  # (B,) per-pair margin, NaN where the data has none
    # With shared_prompt: each prompt once, for model.forward.shared_prompt_hidden.
    prompt_ids: NotRequired[torch.Tensor]  # (B, P) left-padded
    prompt_mask: NotRequired[torch.Tensor]  # (B, P)
    response_ids: NotRequired[torch.Tensor]  # (N, R) right-padded, rows as in input_ids
    response_mask: NotRequired[torch.Tensor]  # (N, R)
    row_example: NotRequired[torch.Tensor]  # (N,) the example (prompt) of each row


def ends_at_eos(response: list[int], eos_id: int) -> list[int]:
    """A response as a reward model reads it: up to and including its last EOS, or with EOS
    appended when it has none (cut off by truncation or by max_new_tokens). A chat template
    may write text after EOS (ChatML's newline after <|im_end|>); generation stops at the EOS,
    so training, `rlhf score`, online scoring and `rlhf eval` all score the EOS position."""
    for i in range(len(response) - 1, -1, -1):
        if response[i] == eos_id:
            return response[: i + 1]
    return [*response, eos_id]


def collate_preference(
    examples: list[PreferenceExample],
    pad_id: int,
    eos_id: int | None = None,
    shared_prompt: bool = False,
    multiple: int = 1,
    pack: int | None = None,
    slices: bool = False,
) -> PreferenceBatch:
    """Rows ordered rank-major (all rank-0 responses, then rank 1, ...). With `eos_id`, each
    row ends at its EOS (ends_at_eos: reward models score that position).
    With `shared_prompt` (and a prompt in every example), also the prompts (once each) and the
    responses apart. Every padded
    width is rounded up to a multiple of `multiple`.
    With `pack` (train.packing: data.max_length), the rows are packed instead (pack_rows): an
    example's responses stay together in one row (a preference pair is one unit), examples
    placed by their summed lengths into rows of up to `pack` tokens (pack_bins; an example
    longer than that gets a row of its own); the shared-prompt layout is not built; `slices`:
    as collate_sft's."""
    k_max = max(len(ex["responses_ids"]) for ex in examples)
    index = torch.full((len(examples), k_max), -1, dtype=torch.long)
    ids, labels, responses, row_example = [], [], [], []
    for k in range(k_max):
        for b, ex in enumerate(examples):
            if k >= len(ex["responses_ids"]):
                continue
            response = list(ex["responses_ids"][k])
            if eos_id is not None:
                response = ends_at_eos(response, eos_id)
            index[b, k] = len(ids)
            ids.append(ex["prompt_ids"] + response)
            labels.append([IGNORE_INDEX] * len(ex["prompt_ids"]) + response)
            responses.append(response)
            row_example.append(b)
    margins = [ex.get("margin") for ex in examples]
    margin = torch.tensor([float("nan") if m is None else m for m in margins])
    if pack:
        sizes = [
            sum(len(ids[j]) for j in index[b].tolist() if j >= 0) for b in range(len(examples))
        ]
        rows = [
            [j for b in group for j in index[b].tolist() if j >= 0]
            for group in pack_bins(sizes, pack, multiple)
        ]
        packed = pack_rows(ids, labels, rows, pad_id, multiple)
        return {**packed, "index": index, "margin": margin, "slices": slices}  # type: ignore[typeddict-item]
    batch = PreferenceBatch(
        input_ids=pad(ids, pad_id, multiple=multiple),
        attention_mask=pad([[1] * len(s) for s in ids], 0, multiple=multiple),
        labels=pad(labels, IGNORE_INDEX, multiple=multiple),
        index=index,
        margin=margin,
    )
    # A row without a prompt has no prompt position to predict its first response token from:
    # such a batch takes the plain layout (the same numbers, one forward per row).
    if shared_prompt and all(ex["prompt_ids"] for ex in examples):
        prompts = [ex["prompt_ids"] for ex in examples]
        batch["prompt_ids"] = pad(prompts, pad_id, left=True, multiple=multiple)
        batch["prompt_mask"] = pad([[1] * len(p) for p in prompts], 0, left=True, multiple=multiple)
        batch["response_ids"] = pad(responses, pad_id, multiple=multiple)
        batch["response_mask"] = pad([[1] * len(r) for r in responses], 0, multiple=multiple)
        batch["row_example"] = torch.tensor(row_example, dtype=torch.long)
    return batch


def move(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }
