"""train.packing: examples packed several to a row give the unpacked numbers; the layout by
hand; data.group_by_length."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from conftest import adapter, assert_resume_equals, read_metrics, train_in_process

from rlhf_cli.data.batches import best_fit_decreasing, pack_bins, pack_rows
from rlhf_cli.losses import IGNORE_INDEX


def test_best_fit_decreasing_by_hand():
    # Longest first: 7 -> bin A (room 3); 5 -> new bin B (room 5); 4 -> B, the only one it fits
    # (room 1); 3 -> A (room 0); 2 -> fits nowhere: bin C. First fit would put 4 in B too but
    # 3 nowhere and 2 in B: best fit keeps the bins fuller.
    assert best_fit_decreasing([5, 3, 7, 2, 4], 10) == [[2, 1], [0, 4], [3]]
    # Best fit, not first fit: 2 goes to the bin with the least room that holds it (B, room 2),
    # not the first one (A, room 4).
    assert best_fit_decreasing([6, 8, 2], 10) == [[1, 2], [0]]
    # Longer than a row: a row of its own; ties keep index order.
    assert best_fit_decreasing([12, 3, 3], 10) == [[0], [1, 2]]


def test_pack_bins_by_hand():
    # Room for all: one row of 18 (padding them would take 4 x 10).
    assert pack_bins([10, 3, 3, 2], limit=100) == [[0, 1, 2, 3]]
    # Rows of at most 12: best fit at 12 gives [10, 2] and [3, 3]: 2 x 12 = 24 positions; at
    # 10 (the longest item) [10] and [3, 3, 2]: 2 x 10 = 20, the fewest.
    assert pack_bins([10, 3, 3, 2], limit=12) == [[0], [1, 2, 3]]
    # Rounded up to 8, both are 2 x 16: the first (fewest rows tried first) is kept.
    assert pack_bins([10, 3, 3, 2], limit=12, multiple=8) == [[0, 3], [1, 2]]
    # Never more positions than padding: equal lengths stay one to a row.
    assert pack_bins([5, 5, 5], limit=8) == [[0], [1], [2]]


def test_pack_rows_by_hand():
    seqs = [[11, 12, 13], [21, 22], [31]]
    labels = [[-100, 12, 13], [21, 22], [31]]  # the second has no prompt: its first is a label
    p = pack_rows(seqs, labels, [[0, 2], [1]], pad_id=0, multiple=3)
    # Row 0: 3 + 1 tokens, rounded up to 6; row 1: 2 tokens and padding.
    assert p["input_ids"].tolist() == [[11, 12, 13, 31, 0, 0], [21, 22, 0, 0, 0, 0]]
    # Positions restart at each sequence; padding runs on as a sequence of its own.
    assert p["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1], [0, 1, 0, 1, 2, 3]]
    # Each sequence's first label dropped: the token before it belongs to another sequence.
    x = IGNORE_INDEX
    assert p["labels"].tolist() == [[x, 12, 13, x, x, x], [x, 22, x, x, x, x]]
    assert p["sequence"].tolist() == [[0, 0, 0, 2, -1, -1], [1, 1, -1, -1, -1, -1]]
    assert p["last"].tolist() == [2, 7, 3]  # flat positions: row * 6 + column


def test_varlen_bounds_by_hand():
    from rlhf_cli.model.kernels import varlen_bounds

    # pack_rows' position ids (test above): sequences start where the position is 0, in the
    # rows' flattened positions; padding runs count as sequences of their own.
    positions = torch.tensor([[0, 1, 2, 0, 0, 1], [0, 1, 0, 1, 2, 3]])
    assert varlen_bounds(positions).tolist() == [0, 3, 4, 6, 8, 12]
    # A first run that does not start at 0, and a row whose ids go on from the row before:
    # each still starts a sequence (a reshape crashed on the first).
    positions = torch.tensor([[2, 3, 4, 0, 1], [5, 6, 0, 1, 2]])
    assert varlen_bounds(positions).tolist() == [0, 3, 5, 7, 10]


class Module(torch.nn.Module):
    """What an attention layer gives its attention function (dropout reads .training; SDPA's
    grouped-query path, num_key_value_groups)."""

    def __init__(self, groups: int = 1):
        super().__init__()
        self.num_key_value_groups = groups


def block_diagonal_sdpa(q, k, v, positions):
    """The reference: SDPA over the whole rows with a block-diagonal causal mask."""
    seq = (positions == 0).cumsum(-1)  # the sequence of each position, per row
    causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
    mask = (seq[:, :, None] == seq[:, None, :]) & causal
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_varlen_attention_equals_the_block_diagonal_mask(kv_heads):
    """train.packing_attention=varlen: SDPA on each sequence alone gives the outputs and
    gradients of one SDPA over the rows with the block-diagonal causal mask; a sequence that
    attended to the one before it (a mutant) would move every position after the first."""
    from rlhf_cli.model.kernels import varlen_attention

    g = torch.Generator().manual_seed(0)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 0, 1, 2, 3, 4, 0]])
    q = torch.randn(2, 4, 8, 16, generator=g, requires_grad=True)
    k = torch.randn(2, kv_heads, 8, 16, generator=g, requires_grad=True)
    v = torch.randn(2, kv_heads, 8, 16, generator=g, requires_grad=True)
    want = block_diagonal_sdpa(q, k, v, positions).transpose(1, 2)  # (R, T, H, D)
    w = torch.randn(want.shape, generator=g)
    want_grads = torch.autograd.grad((want * w).sum(), (q, k, v))
    got, _ = varlen_attention(Module(), q, k, v, None, position_ids=positions)
    got_grads = torch.autograd.grad((got * w).sum(), (q, k, v))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # Unpacked rows (positions 0..T-1) and padded rows (a mask) are plain SDPA's.
    plain = torch.arange(8).expand(2, 8)
    got, _ = varlen_attention(Module(4 // kv_heads), q, k, v, None, position_ids=plain)
    torch.testing.assert_close(got, block_diagonal_sdpa(q, k, v, plain).transpose(1, 2))


def test_varlen_attention_refuses_what_it_cannot_keep():
    from rlhf_cli.core.errors import UserError
    from rlhf_cli.model.kernels import varlen_attention

    q = torch.randn(1, 2, 6, 8)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1]])
    with pytest.raises(UserError, match="sliding window; use train.packing_attention=mask"):
        varlen_attention(Module(), q, q, q, None, position_ids=positions, sliding_window=3)
    with pytest.raises(UserError, match="soft-caps"):
        varlen_attention(Module(), q, q, q, None, position_ids=positions, softcap=30.0)
    # A window no example outgrows changes nothing.
    varlen_attention(Module(), q, q, q, None, position_ids=positions, sliding_window=4)


@contextlib.contextmanager
def attention(model, mode: str):
    """The model on train.packing_attention=mode's attention for the block (then SDPA)."""
    from rlhf_cli.model.kernels import register_varlen

    name = register_varlen() if mode == "varlen" else "sdpa"
    model.set_attn_implementation(name)
    assert model.config._attn_implementation == name
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")


MODES = ["mask", "varlen", "slices"]


@pytest.fixture(scope="module")
def tiny():
    """The tiny model with a non-zero adapter (LoRA B starts at zero), no dropout, a reward
    head, and preference examples of different lengths, a ranked one and one without prompt."""
    from conftest import compose

    from rlhf_cli.data.examples import load_datasets
    from rlhf_cli.model.heads import ScalarHead
    from rlhf_cli.model.load import load_model, load_tokenizer, resolve_device

    cfg = compose("stage=dpo", "quant=none", "peft.dropout=0", "data.max_samples=8")
    tok = load_tokenizer(cfg.model)
    torch.manual_seed(0)
    model = load_model(cfg, resolve_device("cpu"), tok)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    head = ScalarHead(model.config.hidden_size)
    torch.nn.init.normal_(head.linear.weight, std=0.1)
    examples, _, _ = load_datasets(cfg.data, tok, "preference", 0)
    examples = examples[:5]
    examples[1] = dict(examples[1], prompt_ids=examples[1]["prompt_ids"][:5])
    ranked = examples[2]["responses_ids"]
    examples[2] = dict(examples[2], responses_ids=[*ranked, ranked[0][:3]])
    examples[3] = dict(examples[3], prompt_ids=[])  # no prompt: its first token is never scored
    return model, head, tok, examples


def _grads(model, head) -> list[torch.Tensor]:
    return [p.grad.clone() for p in [*model.parameters(), *head.parameters()] if p.requires_grad]


@pytest.mark.parametrize("mode", MODES)
def test_packed_preference_rows_equal_padded_rows(tiny, mode):
    """DPO's summed log-probs and counts, and the reward model's last-token scores, with their
    gradients: packed rows (two rows of 3 and 2 examples here, so sequences share a row and
    would see each other without the block-diagonal mask) equal the padded batch."""
    from rlhf_cli.data.batches import collate_preference
    from rlhf_cli.model.forward import response_logps
    from rlhf_cli.model.heads import sequence_scores

    model, head, tok, examples = tiny
    longest = max(
        sum(len(ex["prompt_ids"]) + len(r) + 1 for r in ex["responses_ids"]) for ex in examples
    )

    def run(pack):
        batch = collate_preference(
            examples, tok.pad_token_id, tok.eos_token_id, pack=pack, slices=mode == "slices"
        )
        model.zero_grad()
        head.zero_grad()
        logps, counts = response_logps(model, batch)
        scores = sequence_scores(model, head, batch)
        (logps.sum() + scores.sum()).backward()
        return batch, logps.detach(), counts, scores.detach(), _grads(model, head)

    _, logps, counts, scores, grads = run(None)
    with attention(model, mode):
        packed, p_logps, p_counts, p_scores, p_grads = run(longest + 20)
    rows = packed["input_ids"].shape[0]
    assert rows < len(examples) and (packed["sequence"].amax(1) > packed["sequence"][:, 0]).all()
    assert len(logps) == 11 and torch.equal(counts, p_counts)
    torch.testing.assert_close(p_logps, logps, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(p_scores, scores, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, p_grads, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    # An example's responses stay in one row.
    for b in range(len(examples)):
        where = {
            int(packed["last"][j]) // packed["input_ids"].shape[1]
            for j in packed["index"][b]
            if j >= 0
        }
        assert len(where) == 1


@pytest.mark.parametrize("mode", MODES)
def test_packed_sft_rows_equal_padded_rows(tiny, mode):
    from rlhf_cli.data.batches import collate_sft
    from rlhf_cli.model.forward import labelled_logps

    model, head, tok, examples = tiny
    sft = [
        {"input_ids": ex["prompt_ids"] + r, "labels": [IGNORE_INDEX] * len(ex["prompt_ids"]) + r}
        for ex in examples
        for r in ex["responses_ids"]
    ]

    def run(pack):
        batch = collate_sft(sft, tok.pad_token_id, multiple=8, pack=pack, slices=mode == "slices")
        model.zero_grad()
        logps, rows = labelled_logps(model, batch)
        logps.sum().backward()
        return batch, logps.detach(), rows, _grads(model, head)[:-2]

    _, logps, rows, grads = run(None)
    with attention(model, mode):
        packed, p_logps, p_rows, p_grads = run(96)
    assert packed["input_ids"].shape[0] < len(sft)
    # The same labels, row by row (packing reorders rows: compare each row's sum).
    assert torch.equal(torch.bincount(rows), torch.bincount(p_rows))
    sums = torch.zeros(len(sft)).index_add(0, rows, logps)
    p_sums = torch.zeros(len(sft)).index_add(0, p_rows, p_logps)
    torch.testing.assert_close(p_sums, sums, atol=1e-4, rtol=1e-5)
    for a, b in zip(grads, p_grads, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


WORDS = "the cat sat on a mat and then it ran to the big red house near green hills".split()


def words(n: int, start: int) -> str:
    return " ".join(WORDS[(start + k) % len(WORDS)] for k in range(n))


def uneven_pairs(path, n: int = 24):
    """Preference rows whose lengths vary widely (a word to dozens), as real data's do; rows
    0 and 7 longer than data.max_length=160 (cut on loading)."""
    rows = [
        {
            "prompt": f"question {i}: " + words(1 + 7 * (i % 3), i),
            "chosen": words(200 if i in (0, 7) else 2 if i % 2 else 40, i + 1),
            "rejected": words(3 if i % 4 else 30, i + 2),
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def adapters_agree(a: dict, b: dict) -> bool:
    """Within 1e-4 but for at most 2 elements of all. Adam divides each gradient element by
    its own root mean square: where an element's gradient is ~0, float summation-order noise
    flips its update's sign (a 1.8e-3 difference in 1 of 2048 elements seen for dpo after 3
    steps at lr 2e-3, losses and gradient norms equal to 1e-5); a misplaced or unmasked
    position moves thousands of elements."""
    assert a.keys() == b.keys()
    off = sum(int(((a[k].float() - b[k].float()).abs() > 1e-4).sum()) for k in a)
    return off <= 2


def padded_and_packed(tmp_path, common: tuple, mode: str) -> tuple[list, list]:
    """Three steps of `common` padded (run a) and packed (run b): both runs' metrics."""
    train_in_process(tmp_path / "a", *common, "train.packing=false")
    packing = ("train.packing=true", f"train.packing_attention={mode}")
    train_in_process(tmp_path / "b", *common, *packing)
    runs = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert len(runs[0]) == 3
    return runs


@pytest.mark.parametrize(
    "stage, mode",
    # Each stage once, each attention path on a stage with one and with several responses.
    [("sft", "mask"), ("sft", "varlen"), ("dpo", "varlen"), ("rm", "slices"), ("kto", "mask")],
)
def test_packed_training_equals_padded(tmp_path, stage, mode):
    """Three steps with train.packing (rows of up to 160 tokens) and without, on rows of very
    different lengths: the same losses, gradient norms and adapter, and less padding."""
    data = uneven_pairs(tmp_path / "pairs.jsonl")
    common = (f"stage={stage}", f"data.path={data}", "data.eval_size=0")
    common += ("train.micro_batch_size=4", "train.max_steps=3", "optim.lr=2e-3", "quant=none")
    common += ("peft.dropout=0", "data.max_length=160")
    runs = padded_and_packed(tmp_path, common, mode)
    for x, y in zip(*runs, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
        assert y["padding"] < x["padding"], (x["padding"], y["padding"])
    assert adapters_agree(adapter(tmp_path / "a"), adapter(tmp_path / "b"))


def test_grouped_by_length_by_hand():
    from rlhf_cli.trainer.state import grouped_by_length

    lengths = [5, 80, 7, 60, 90, 6, 70, 8, 3]
    order = [8, 0, 1, 2, 3, 4, 5, 6, 7]  # an epoch's shuffled order; 9 = 4 steps of 2 + 1
    out = grouped_by_length(order, lengths, size=2, epoch=0, seed=1)
    steps = [sorted(out[k : k + 2]) for k in range(0, 8, 2)]
    # The 8 examples of whole steps sorted longest first (90 80 | 70 60 | 7 6 | 5 3: indices
    # 4 1 | 6 3 | 2 5 | 0 8), the steps then in a seeded order; the tail (index 7, the last of
    # `order`) was in no step: it stays last, ungrouped.
    assert out[-1] == 7 and sorted(out) == list(range(9))
    assert sorted(steps) == [[0, 8], [1, 4], [2, 5], [3, 6]]
    assert grouped_by_length(order, lengths, 2, 0, 1) == out  # a function of the seed and epoch
    others = {tuple(grouped_by_length(order, lengths, 2, e, 1)) for e in range(1, 6)}
    assert len(others | {tuple(out)}) > 1  # ... and the steps' order moves with the epoch


@pytest.mark.slow
def test_group_by_length_pads_less_and_resumes_exactly(tmp_path):
    """On rows of very different lengths, a step's examples have similar lengths: less padding
    than the plain order over the same epoch; a resumed run (across the epoch's end) equals the
    uninterrupted one, packed or not."""
    data = uneven_pairs(tmp_path / "pairs.jsonl")
    common = ("stage=dpo", f"data.path={data}", "data.eval_size=0", "train.micro_batch_size=2")
    common += ("train.grad_accum=2", "train.max_steps=6", "quant=none")
    train_in_process(tmp_path / "plain", *common)
    args = (*common, "data.group_by_length=true", "train.max_steps=8", "train.save_every=4")
    grouped, _ = assert_resume_equals(tmp_path, args, last_step=4)
    # Packed too (rows of up to 160 tokens; two examples are cut to that on loading).
    packed = (*args, "train.packing=true", "data.max_length=160")
    assert_resume_equals(tmp_path / "packed", packed, last_step=4)
    plain = read_metrics(tmp_path / "plain")
    mean = lambda rows: sum(r["padding"] for r in rows) / len(rows)  # noqa: E731
    assert mean(grouped[:6]) < 0.7 * mean(plain), (mean(grouped[:6]), mean(plain))


@pytest.mark.parametrize("mode", MODES)
def test_packed_hidden_equals_the_padded_forward(tiny, mode):
    """The online stages' padded rows (left-padded prompts, right-padded responses, a hole
    between turns): the hidden states at every real position equal the padded forward's with
    position ids that skip padding; zeros at padding."""
    from rlhf_cli.model.forward import decoder, packed_hidden, position_ids

    model, _, _, _ = tiny
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (4, 12), generator=g)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    mask[1, 9:] = 0  # right padding
    mask[2, 3:5] = 0  # a hole
    mask[3, :2] = 0
    mask[3, 10:] = 0
    with torch.no_grad():
        want = decoder(model)(
            input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)
        ).last_hidden_state
        with attention(model, mode):
            got = packed_hidden(model, ids, mask, limit=24, slices=mode == "slices")
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[~keep], torch.zeros_like(got[~keep]))


@pytest.mark.parametrize("stage, mode", [("grpo", "varlen"), ("ppo", "slices")])
def test_packed_online_training_equals_padded(tmp_path, stage, mode):
    """The online stages' log-prob, reference, value and update passes with train.packing:
    the same scores, KL, losses and adapter over three steps."""
    common = (f"stage={stage}", "data.eval_size=0", "stage.max_new_tokens=16")
    common += ("stage.rollout_batch_size=8", "train.max_steps=3", "optim.lr=2e-3")
    common += ("quant=none", "stage.kl_coef=0.05", "data.max_length=160")
    common += ("reward.fn=rlhf_cli.rewards:char_fraction",)
    runs = padded_and_packed(tmp_path, common, mode)
    for x, y in zip(*runs, strict=True):
        for key in ("score", "kl", "loss"):
            assert x[key] == pytest.approx(y[key], abs=1e-5), key
    files = ("adapter_model.safetensors",) + (("value_head.safetensors",) if stage == "ppo" else ())
    for name in files:
        assert adapters_agree(*(adapter(tmp_path / d, name=name) for d in "ab")), name


def test_data_inspect_batch_layout_by_hand():
    """Four examples of 10, 2, 2 and 2 tokens, one micro-batch: padded to 10, 40 positions for
    16 tokens (60% padding); packed into one row of 16 (0%). Grouped by length: the same batch."""
    from conftest import compose

    from rlhf_cli.tools.inspect import batch_layout

    cfg = compose(
        "train.micro_batch_size=4",
        "train.shuffle=false",
        "train.pad_to_multiple_of=1",
        "data.max_length=16",
        "data.max_prompt_length=8",
    )
    train = [{"input_ids": [1] * n, "labels": [1] * n} for n in (2, 10, 2, 2)]
    assert batch_layout(train, cfg) == (
        "batches (1 micro-batches of 4, the first 1 steps; data.group_by_length=false): "
        "padding 60% of the positions; train.packing=true: 0% (1.0 rows a micro-batch, 4.0 "
        "examples and 16 tokens a row of up to data.max_length=16); "
        "data.group_by_length=true: padding 60%, packed 0%"
    )


def test_the_uneven_pairs_hold_rows_cut_at_max_length(tmp_path):
    """The packed-training tests' data: two rows longer than data.max_length=160, so a packed
    row ends with an example cut on loading; lengths from a few tokens to 160."""
    from conftest import compose

    from rlhf_cli.data.examples import load_datasets
    from rlhf_cli.model.load import load_tokenizer

    data = uneven_pairs(tmp_path / "pairs.jsonl")
    cfg = compose("stage=dpo", f"data.path={data}", "data.eval_size=0", "data.max_length=160")
    train, _, reports = load_datasets(cfg.data, load_tokenizer(cfg.model), "preference", 0)
    assert reports[0].truncated == 2
    lengths = [len(ex["prompt_ids"]) + len(r) for ex in train for r in ex["responses_ids"]]
    assert max(lengths) == 160 and min(lengths) == 15
