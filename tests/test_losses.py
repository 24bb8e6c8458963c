"""Hand-worked checks of every function in rlhf_cli.losses.

Each expected number is derived in the test's docstring or comments from the equation,
never by calling the function under test a second way.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_cli import losses as L

LOG2 = math.log(2)


def _close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(actual.float(), expected, atol=atol, rtol=1e-5)


# --------------------------------------------------------------------------- log-probs


def _hand_logits(shift=5.0):
    """1 x 3 x 3 logits whose softmax is known: logits = log(p) + shift.

    Position 0 predicts token 1 with p = [0.5, 0.25, 0.25]; position 1 predicts token 2
    with p = [0.1, 0.2, 0.7]; position 2 predicts nothing (dropped by the shift).
    Adding a constant to a row does not change its softmax.
    """
    probs = torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]]])
    return probs.log() + shift


def test_token_logps_hand_values():
    # labels[1] = 0 is scored by position 0: log 0.5; labels[2] = 2 by position 1: log 0.7
    logps, mask = L.token_logps(_hand_logits(), torch.tensor([[7, 0, 2]]))
    _close(logps, [[math.log(0.5), math.log(0.7)]])
    assert mask.dtype == torch.bool and mask.tolist() == [[True, True]]


def test_token_logps_ignore_index_gives_zero_and_mask():
    # labels[1] ignored -> 0 and mask False; labels[0] is never scored (shifted out)
    logps, mask = L.token_logps(_hand_logits(), torch.tensor([[-100, -100, 2]]))
    _close(logps, [[0.0, math.log(0.7)]])
    assert mask.tolist() == [[False, True]]
    # a custom ignore_index works the same way
    logps, mask = L.token_logps(_hand_logits(), torch.tensor([[1, 1, 2]]), ignore_index=1)
    _close(logps, [[0.0, math.log(0.7)]])


def test_token_logps_matches_naive_log_softmax_with_small_chunks(monkeypatch):
    """Chunking over tokens (chunk 2 < T-1 = 6) agrees with a full log_softmax gather."""
    monkeypatch.setattr(L, "CHUNK_TOKENS", 2)
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11) * 3
    labels = torch.randint(0, 11, (3, 7))
    labels[0, 2:4] = -100
    logps, mask = L.token_logps(logits, labels)
    safe = labels[:, 1:].clamp(min=0)
    naive = F.log_softmax(logits[:, :-1], -1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    naive = naive * (labels[:, 1:] != -100)
    _close(logps, naive, atol=1e-5)
    assert mask.sum() == 3 * 6 - 2


def test_token_logps_gradient_hand_and_naive():
    """d log p(y) / dz = onehot(y) - softmax(z).

    Position 0 (p = [0.5, 0.25, 0.25], label 0): grad [0.5, -0.25, -0.25]; position 1
    (p = [0.1, 0.2, 0.7], label 2): grad [-0.1, -0.2, 0.3]; position 2 gets no gradient.
    """
    logits = _hand_logits().requires_grad_()
    logps, _ = L.token_logps(logits, torch.tensor([[7, 0, 2]]))
    logps.sum().backward()
    _close(logits.grad, [[[0.5, -0.25, -0.25], [-0.1, -0.2, 0.3], [0.0, 0.0, 0.0]]])

    torch.manual_seed(1)
    base = torch.randn(2, 5, 13)
    labels = torch.randint(0, 13, (2, 5))
    labels[1, :3] = -100
    weights = torch.randn(2, 4)  # an arbitrary downstream use of every token
    ours = base.clone().requires_grad_()
    (L.token_logps(ours, labels)[0] * weights).sum().backward()
    ref = base.clone().requires_grad_()
    keep = labels[:, 1:] != -100
    naive = F.log_softmax(ref[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])
    (naive.squeeze(-1) * keep * weights).sum().backward()
    _close(ours.grad, ref.grad, atol=1e-5)


def test_token_logps_bf16_upcasts_and_gradient_matches(monkeypatch):
    """bf16 logits give float32 log-probs equal to the float32 computation on the same
    (bf16-representable) values; the recomputed-chunk backward matches too."""
    monkeypatch.setattr(L, "CHUNK_TOKENS", 3)
    torch.manual_seed(2)
    base = (torch.randn(2, 8, 17) * 4).bfloat16()
    labels = torch.randint(0, 17, (2, 8))
    lp16 = base.clone().requires_grad_()
    out16, _ = L.token_logps(lp16, labels)
    assert out16.dtype == torch.float32
    out16.sum().backward()
    lp32 = base.float().requires_grad_()
    out32, _ = L.token_logps(lp32, labels)
    out32.sum().backward()
    _close(out16, out32, atol=1e-5)
    _close(lp16.grad.float(), lp32.grad, atol=1e-2)  # the gradient itself is stored in bf16


def test_token_logps_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differ"):
        L.token_logps(torch.zeros(1, 3, 4), torch.zeros(1, 4, dtype=torch.long))


def test_sequence_logps_sum_and_average():
    # sum = log 0.5 + log 0.7 = log 0.35; average over the 2 label tokens = log(0.35) / 2
    labels = torch.tensor([[7, 0, 2]])
    _close(L.sequence_logps(_hand_logits(), labels), [math.log(0.35)])
    _close(L.sequence_logps(_hand_logits(), labels, average=True), [math.log(0.35) / 2])
    # one label masked: only log 0.7 remains, averaged over 1 token
    masked = torch.tensor([[7, -100, 2]])
    _close(L.sequence_logps(_hand_logits(), masked, average=True), [math.log(0.7)])
    # nothing to score: 0, not NaN
    empty = torch.full((1, 3), -100)
    _close(L.sequence_logps(_hand_logits(), empty, average=True), [0.0])


def test_nll_sum_hand_value_and_big_batch_mean():
    """-log 0.5 - log 0.7 = -log 0.35 over 2 tokens; and sum/count over micro-batches of
    different lengths equals the token mean of one big batch (F.cross_entropy)."""
    loss, n = L.nll_sum(_hand_logits(), torch.tensor([[7, 0, 2]]))
    _close(loss, -math.log(0.35))
    assert n.item() == 2

    torch.manual_seed(3)
    logits = torch.randn(4, 6, 9)
    labels = torch.randint(0, 9, (4, 6))
    labels[0, :5] = -100  # micro-batch 1 has far fewer tokens than micro-batch 2
    parts = [L.nll_sum(logits[i : i + 2], labels[i : i + 2]) for i in (0, 2)]
    accumulated = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    big = F.cross_entropy(logits[:, :-1].reshape(-1, 9), labels[:, 1:].reshape(-1))
    _close(accumulated, big, atol=1e-5)


# --------------------------------------------------------------------------- DPO


def _dpo(h_chosen, h_rejected, **kw):
    """Policy log-ratios h_chosen/h_rejected against a zero reference."""
    z = torch.zeros(len(h_chosen))
    return L.dpo_loss(torch.tensor(h_chosen), torch.tensor(h_rejected), z, z, **kw)


def test_dpo_sigmoid_is_log2_when_policy_equals_reference():
    pol_c, pol_r = torch.tensor([-3.0, -10.0]), torch.tensor([-4.0, -2.0])
    losses, rc, rr = L.dpo_loss(pol_c, pol_r, pol_c.clone(), pol_r.clone(), beta=0.1)
    _close(losses, [LOG2, LOG2])
    _close(rc, [0.0, 0.0])
    _close(rr, [0.0, 0.0])


def test_dpo_sigmoid_hand_value_and_rewards():
    """beta = 0.5, h = 2 log 3: beta*h = log 3, sigma(log 3) = 3/4, loss = log(4/3).
    chosen reward = 0.5 * 2 log 3 = log 3, rejected reward = 0."""
    losses, rc, rr = _dpo([2 * math.log(3)], [0.0], beta=0.5)
    _close(losses, [math.log(4 / 3)])
    _close(rc, [math.log(3)])
    _close(rr, [0.0])
    assert not rc.requires_grad


def test_dpo_rewards_use_reference_and_are_detached():
    pol_c = torch.tensor([-1.0], requires_grad=True)
    pol_r = torch.tensor([-5.0], requires_grad=True)
    # rewards = 0.1 * (-1 - -3) = 0.2 and 0.1 * (-5 - -4) = -0.1; h = 2 - (-1) = 3
    losses, rc, rr = L.dpo_loss(pol_c, pol_r, torch.tensor([-3.0]), torch.tensor([-4.0]), beta=0.1)
    _close(rc, [0.2])
    _close(rr, [-0.1])
    _close(losses, [-math.log(1 / (1 + math.exp(-0.3)))])
    losses.sum().backward()
    # dL/dpi_w = -beta * sigma(-beta h) = -0.1 / (1 + e^0.3); dL/dpi_l is its negative
    g = -0.1 / (1 + math.exp(0.3))
    _close(pol_c.grad, [g])
    _close(pol_r.grad, [-g])


def test_cdpo_label_smoothing():
    """eps = 0.25, beta*h = log 3: sigma = 3/4, sigma(-) = 1/4;
    loss = -0.75 log(3/4) - 0.25 log(1/4) = 0.75 log(4/3) + 0.25 log 4.
    At h = 0 it is still log 2 (both terms are log 2)."""
    losses, _, _ = _dpo([2 * math.log(3), 0.0], [0.0, 0.0], beta=0.5, label_smoothing=0.25)
    _close(losses, [0.75 * math.log(4 / 3) + 0.25 * math.log(4), LOG2])


def test_ipo_minimum_at_half_inverse_beta():
    """beta = 0.25: target h = 1/(2*0.25) = 2; loss (h-2)^2 = 4, 1, 0, 1 at h = 0, 1, 2, 3."""
    losses, _, _ = _dpo([0.0, 1.0, 2.0, 3.0], [0.0] * 4, beta=0.25, loss_type="ipo")
    _close(losses, [4.0, 1.0, 0.0, 1.0])
    # h is a difference: the same h = 2 from rejected side gives 0 too
    losses, _, _ = _dpo([0.5], [-1.5], beta=0.25, loss_type="ipo")
    _close(losses, [0.0])


def test_hinge_loss_and_zero_gradient_past_margin():
    """beta = 0.5: max(0, 1 - h/2) = 2, 1, 0, 0 at h = -2, 0, 2, 4."""
    pol_c = torch.tensor([-2.0, 0.0, 2.0, 4.0], requires_grad=True)
    z = torch.zeros(4)
    losses, _, _ = L.dpo_loss(pol_c, z, z, z, beta=0.5, loss_type="hinge")
    _close(losses, [2.0, 1.0, 0.0, 0.0])
    losses.sum().backward()
    _close(pol_c.grad, [-0.5, -0.5, 0.0, 0.0])


def test_dpo_bad_arguments():
    with pytest.raises(ValueError, match=r"'bogus'.*hinge.*ipo.*sigmoid"):
        _dpo([0.0], [0.0], beta=0.1, loss_type="bogus")
    with pytest.raises(ValueError, match="label_smoothing only applies"):
        _dpo([0.0], [0.0], beta=0.1, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta"):
        _dpo([0.0], [0.0], beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing must be"):
        _dpo([0.0], [0.0], beta=0.1, label_smoothing=0.7)


# --------------------------------------------------------------------------- reward model


def test_reward_loss_bradley_terry_margin_centering():
    # equal rewards: -log sigma(0) = log 2; r_w - r_l = log 3: -log(3/4) = log(4/3)
    _close(
        L.reward_loss(torch.tensor([1.0, math.log(3)]), torch.tensor([1.0, 0.0])),
        [LOG2, math.log(4 / 3)],
    )
    # margin m = 2 cancels r_w - r_l = 2 -> log 2; m = 0 leaves -log sigma(2)
    r_w, r_l = torch.tensor([2.0, 2.0]), torch.tensor([0.0, 0.0])
    _close(
        L.reward_loss(r_w, r_l, margin=torch.tensor([2.0, 0.0])), [LOG2, math.log(1 + math.exp(-2))]
    )
    # centering: r_w = r_l = 1 -> log 2 + 0.01 * (1 + 1)^2 = log 2 + 0.04
    _close(L.reward_loss(torch.tensor([1.0]), torch.tensor([1.0]), center_coef=0.01), [LOG2 + 0.04])


def test_reward_loss_gradient():
    """dL/dr_w = -sigma(-(r_w - r_l)) = -1/2 at equal rewards; centering adds
    2c(r_w + r_l) = 2 * 0.01 * 2 = 0.04 to both."""
    r_w = torch.tensor([1.0], requires_grad=True)
    r_l = torch.tensor([1.0], requires_grad=True)
    L.reward_loss(r_w, r_l, center_coef=0.01).sum().backward()
    _close(r_w.grad, [-0.5 + 0.04])
    _close(r_l.grad, [0.5 + 0.04])


def test_plackett_luce_k2_is_bradley_terry():
    """K = 2: -(s_1 - logsumexp(s_1, s_2)) = log(1 + e^{s_2 - s_1}) = -log sigma(s_1 - s_2)."""
    scores = torch.tensor([[1.0, 1.0], [math.log(3), 0.0], [-2.0, 3.0]])
    _close(L.plackett_luce_loss(scores), [LOG2, math.log(4 / 3), math.log(1 + math.exp(5))])


def test_plackett_luce_k3_hand_value():
    """exp(s) = [3, 2, 1]: -(log 3 - log 6) - (log 2 - log 3) = log 2 + log 1.5 = log 3."""
    scores = torch.tensor([[math.log(3), math.log(2), 0.0]])
    _close(L.plackett_luce_loss(scores), [math.log(3)])


def test_plackett_luce_ragged_mask():
    """Row 2 has K = 2 valid entries, exp = [3, 2]: -(log 3 - log 5) = log(5/3); its
    padded score (100) gets no gradient and changes nothing."""
    scores = torch.tensor([[math.log(3), math.log(2), 0.0], [math.log(3), math.log(2), 100.0]])
    scores.requires_grad_()
    mask = torch.tensor([[True, True, True], [True, True, False]])
    losses = L.plackett_luce_loss(scores, mask)
    _close(losses, [math.log(3), math.log(5 / 3)])
    losses.sum().backward()
    assert torch.isfinite(scores.grad).all()
    assert scores.grad[1, 2] == 0
    # row 2's gradient is that of BT on (log 3, log 2): -sigma(-(s1 - s2)) = -2/5
    _close(scores.grad[1, :2], [-0.4, 0.4])


# --------------------------------------------------------------------------- KL, masks


def test_kl_estimators_hand_values():
    """logp = -log 2, ref = 0, so r = ref - logp = log 2:
    k1 = -log 2, k2 = 0.5 (log 2)^2, k3 = e^{log 2} - 1 - log 2 = 1 - log 2."""
    logp, ref = torch.tensor([-LOG2]), torch.tensor([0.0])
    _close(L.kl_penalty(logp, ref), [-LOG2])
    _close(L.kl_penalty(logp, ref, "k2"), [0.5 * LOG2**2])
    _close(L.kl_penalty(logp, ref, "k3"), [1 - LOG2])


def test_kl_estimators_zero_when_equal_and_k3_nonnegative():
    torch.manual_seed(4)
    a, b = torch.randn(1000), torch.randn(1000)
    for est in ("k1", "k2", "k3"):
        _close(L.kl_penalty(a, a.clone(), est), torch.zeros(1000))
    assert (L.kl_penalty(a, b, "k3") >= 0).all()
    assert (L.kl_penalty(a, b, "k2") >= 0).all()
    assert (L.kl_penalty(a, b, "k1") < 0).any()  # k1 is unbiased but not pointwise >= 0
    with pytest.raises(ValueError, match="k1.*k2.*k3"):
        L.kl_penalty(a, b, "k4")


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    _close(L.masked_mean(x, mask), 7 / 3)  # (1 + 2 + 4) / 3; nan/inf are masked out
    _close(L.masked_mean(x, mask, dim=-1), [1.5, 4.0])
    _close(L.masked_mean(x, torch.zeros_like(mask)), 0.0)


def test_masked_whiten():
    """Valid [1, 5, 6]: mean 4, (biased) variance (9 + 1 + 4) / 3 = 14/3 -> (x - 4) / sqrt(14/3);
    scale only adds the mean back. A variance other than 1 and a count other than 2: a missing
    division, or the unbiased n - 1, changes the answer."""
    x = torch.tensor([1.0, 5.0, 100.0, 6.0])
    mask = torch.tensor([True, True, False, True])
    std = (14 / 3) ** 0.5
    expected = [-3 / std, 1 / std, 0.0, 2 / std]
    _close(L.masked_whiten(x, mask), expected, atol=1e-6)
    _close(
        L.masked_whiten(x, mask, shift_mean=False),
        [v + 4 if m else 0.0 for v, m in zip(expected, mask.tolist())],
        atol=1e-6,
    )


# --------------------------------------------------------------------------- GAE, groups


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    """Rewards [1, 2, 3] -> reward-to-go [6, 5, 3]; V = 0.5 -> A = [5.5, 4.5, 2.5],
    returns = A + V = [6, 5, 3]."""
    adv, ret = L.gae_advantages(
        torch.tensor([[1.0, 2.0, 3.0]]),
        torch.full((1, 3), 0.5),
        torch.ones(1, 3),
        gamma=1.0,
        lam=1.0,
    )
    _close(adv, [[5.5, 4.5, 2.5]])
    _close(ret, [[6.0, 5.0, 3.0]])


def test_gae_lambda_zero_is_one_step_td():
    """gamma = 0.5, lam = 0: A_t = r_t + 0.5 V_{t+1} - V_t with V = [1, 2, 4], V_3 = 0:
    A = [1 + 1 - 1, 0 + 2 - 2, 2 + 0 - 4] = [1, 0, -2]."""
    adv, ret = L.gae_advantages(
        torch.tensor([[1.0, 0.0, 2.0]]),
        torch.tensor([[1.0, 2.0, 4.0]]),
        torch.ones(1, 3),
        gamma=0.5,
        lam=0.0,
    )
    _close(adv, [[1.0, 0.0, -2.0]])
    _close(ret, [[2.0, 2.0, 2.0]])


def test_gae_masking():
    """Prompt (left) and padding (right) positions carry garbage (9) that must not leak:
    the valid middle equals the unmasked example [5.5, 4.5, 2.5]; masked A = 0.
    A masked hole is skipped: [1, x, 3] with V = 0.5 -> A_2 = 2.5, A_0 = 1 + 0.5 - 0.5 + 2.5."""
    rewards = torch.tensor([[9.0, 1.0, 2.0, 3.0, 9.0], [1.0, 9.0, 3.0, 0.0, 0.0]])
    values = torch.tensor([[9.0, 0.5, 0.5, 0.5, 9.0], [0.5, 9.0, 0.5, 0.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 0, 1, 0, 0]])
    adv, ret = L.gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    _close(adv, [[0.0, 5.5, 4.5, 2.5, 0.0], [3.5, 0.0, 2.5, 0.0, 0.0]])
    _close(ret, adv + values)


def test_group_advantages_grpo_and_rloo():
    """Group [1, 2, 3]: mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1 -> GRPO [-1, 0, 1]
    (divided by 1 + eps). RLOO: 1 - (2+3)/2, 2 - (1+3)/2, 3 - (1+2)/2 = [-1.5, 0, 1.5].
    Group [5, 5, 5] carries no signal: 0 for both."""
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    eps = 1e-4
    _close(L.group_advantages(rewards, 3), [-1 / (1 + eps), 0.0, 1 / (1 + eps), 0.0, 0.0, 0.0])
    _close(L.group_advantages(rewards, 3, kind="rloo"), [-1.5, 0.0, 1.5, 0.0, 0.0, 0.0])


def test_group_advantages_bad_arguments():
    with pytest.raises(ValueError, match="grpo.*rloo"):
        L.group_advantages(torch.zeros(4), 2, kind="ppo")
    with pytest.raises(ValueError, match="divide"):
        L.group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match=">= 2"):
        L.group_advantages(torch.zeros(4), 1)


# --------------------------------------------------------------------------- PPO losses


@pytest.mark.parametrize(
    "adv, ratio, loss, grad, clipped",
    [
        # eps = 0.2, d(-A*ratio)/dlogp = -A*ratio where the unclipped term is active
        (1.0, 0.5, -0.5, -0.5, 0.0),  # A > 0, ratio < 0.8: max(-0.5, -0.8) unclipped
        (1.0, 1.0, -1.0, -1.0, 0.0),  # A > 0, inside: both -1
        (1.0, 1.5, -1.2, 0.0, 1.0),  # A > 0, ratio > 1.2: max(-1.5, -1.2) clipped
        (-1.0, 0.5, 0.8, 0.0, 1.0),  # A < 0, ratio < 0.8: max(0.5, 0.8) clipped
        (-1.0, 1.0, 1.0, 1.0, 0.0),  # A < 0, inside: both 1
        (-1.0, 1.5, 1.5, 1.5, 0.0),  # A < 0, ratio > 1.2: max(1.5, 1.2) unclipped
    ],
)
def test_clipped_policy_loss_six_regions(adv, ratio, loss, grad, clipped):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    out, stats = L.clipped_policy_loss(
        logp, torch.zeros(1, 1), torch.tensor([[adv]]), torch.ones(1, 1), clip_eps=0.2
    )
    _close(out, loss)
    out.backward()
    _close(logp.grad, [[grad]])
    _close(stats["clipfrac"], clipped)
    _close(stats["approx_kl"], 0.5 * math.log(ratio) ** 2)


def test_clipped_policy_loss_mask_and_sequence_advantages():
    """Per-sequence A = [2, -1] broadcast over tokens; ratio 1 everywhere so the loss is
    mean(-A) over the 3 valid tokens: (-2 - 2 + 1) / 3 = -1; the padded token is ignored."""
    logp = torch.zeros(2, 2, requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    out, stats = L.clipped_policy_loss(
        logp, torch.zeros(2, 2), torch.tensor([2.0, -1.0]), mask, clip_eps=0.2
    )
    _close(out, -1.0)
    out.backward()
    _close(logp.grad, [[-2 / 3, -2 / 3], [1 / 3, 0.0]])
    _close(stats["clipfrac"], 0.0)


@pytest.mark.parametrize(
    "value, ret, loss, grad, clipfrac",
    [
        # V_old = 1, c = 0.2 (clip window [0.8, 1.2]); loss = 0.5 max(...), grad d/dV
        (2.0, 0.0, 2.0, 2.0, 0.0),  # err 4 vs clipped (1.2)^2 = 1.44: unclipped, grad V-R
        (1.5, 2.0, 0.32, 0.0, 1.0),  # err 0.25 vs clipped (1.2-2)^2 = 0.64: clipped, no grad
        (1.1, 2.0, 0.405, -0.9, 0.0),  # inside the window: both 0.81, grad V-R = -0.9
    ],
)
def test_clipped_value_loss(value, ret, loss, grad, clipfrac):
    v = torch.tensor([value], requires_grad=True)
    out, frac = L.clipped_value_loss(
        v, torch.tensor([1.0]), torch.tensor([ret]), torch.ones(1), clip_range=0.2
    )
    _close(out, loss)
    out.backward()
    _close(v.grad, [grad])
    _close(frac, clipfrac)


def test_adaptive_kl_coef():
    """coef 0.1, target 6, horizon 10000, n_steps 256 (256/10000 = 0.0256):
    KL 6 -> error 0 -> 0.1; KL 6.6 -> error 0.1 -> 0.1 * 1.00256;
    KL 12 -> error 1 clipped to 0.2 -> 0.1 * 1.00512; KL 0 -> -0.2 -> 0.1 * 0.99488."""
    kw = dict(target=6.0, horizon=10000, n_steps=256)
    assert L.adaptive_kl_coef(0.1, 6.0, **kw) == pytest.approx(0.1)
    assert L.adaptive_kl_coef(0.1, 6.6, **kw) == pytest.approx(0.100256)
    assert L.adaptive_kl_coef(0.1, 12.0, **kw) == pytest.approx(0.100512)
    assert L.adaptive_kl_coef(0.1, 0.0, **kw) == pytest.approx(0.099488)
    assert L.adaptive_kl_coef(0.1, torch.tensor(12.0), **kw) == pytest.approx(0.100512)


def test_group_advantages_mean_baseline():
    """Dr. GRPO: R - mean(R) per group. Group [1, 2, 3, 6]: mean 3 -> [-2, -1, 0, 3]."""
    from rlhf_cli.losses import group_advantages

    r = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert torch.allclose(group_advantages(r, 4, kind="mean"), torch.tensor([-2.0, -1.0, 0.0, 3.0]))


# --------------------------------------------------------------------------- KTO, ORPO, SimPO


def test_kto_by_hand():
    """beta = 1, z0 = 0.5. Desirable r = 1.5: 1 - sigma(1) = 0.2689414; desirable r = 0.5:
    1 - sigma(0) = 0.5; undesirable r = -0.5 with w_u = 2: 2 (1 - sigma(0.5 + 0.5)) = 0.5378828.
    r = logp - ref: (-1.0 - -2.5), (-3.0 - -3.5), (-4.0 - -3.5)."""
    policy = torch.tensor([-1.0, -3.0, -4.0], requires_grad=True)
    ref = torch.tensor([-2.5, -3.5, -3.5])
    desirable = torch.tensor([True, True, False])
    z0 = torch.tensor(0.5, requires_grad=True)
    losses = L.kto_loss(policy, ref, desirable, z0, beta=1.0, undesirable_weight=2.0)
    _close(losses, [0.2689414, 0.5, 0.5378828])
    losses.sum().backward()
    assert z0.grad is None  # the reference point is a constant
    # d/dr of 1 - sigma(r - z0) = -sigma'(1) = -0.1966119; of 2 (1 - sigma(z0 - r)) at 1: +0.3932238
    _close(policy.grad, [-0.1966119, -0.25, 0.3932238])


def test_kto_reference_point_is_clamped_at_zero():
    """A negative KL estimate counts as 0: with pi == pi_ref every loss is w / 2."""
    x = torch.tensor([-2.0, -3.0])
    losses = L.kto_loss(x, x.clone(), torch.tensor([True, False]), -3.0, desirable_weight=1.5)
    _close(losses, [0.75, 0.5])


def test_orpo_by_hand():
    """c = log 1/2, r = log 1/4 (mean log-probs): log(1 - e^c) = log 1/2, log(1 - e^r) = log 3/4;
    log_odds = (log 4 - log 2) - (log 1/2 - log 3/4) = log 2 + log 3/2 = log 3;
    -log sigma(log 3) = log 4/3, times lambda = 0.5."""
    losses = L.orpo_loss(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]), lam=0.5)
    _close(losses, [0.5 * math.log(4 / 3)])
    # equal responses: log_odds = 0, loss = lambda log 2
    _close(L.orpo_loss(torch.tensor([-1.3]), torch.tensor([-1.3]), lam=1.0), [LOG2])


def test_log1mexp_is_accurate_near_zero_in_float32():
    """log(1 - e^x) at x = -1e-6 is log(1e-6) (to 1e-6 relative); log1p(-exp(x)) in float32
    rounds exp(x) to 1 and would give -inf or a badly rounded value."""
    x = torch.tensor([-1e-6, -0.1, -5.0], dtype=torch.float32)
    want = [math.log(-math.expm1(v)) for v in (-1e-6, -0.1, -5.0)]
    torch.testing.assert_close(L.log1mexp(x), torch.tensor(want), rtol=1e-6, atol=1e-6)
    assert torch.isfinite(L.orpo_loss(torch.tensor([-1e-7]), torch.tensor([-2.0]), lam=1.0)).all()


def test_log1mexp_gradient_is_finite_up_to_zero():
    """f(x) = log(1 - e^x), f'(x) = -e^x / (1 - e^x) = e^x / expm1(x).
    x = -1e-9: f = log(1e-9) = -20.7233, f' = -1 / 1e-9 = -1e9 (the far branch, log1p(-exp(x)),
    is inf there: before each branch got a safe input, torch.where made its 0 * inf a NaN).
    x = -0.5: f = log(1 - 0.6065307) = -0.9327521, f' = -0.6065307 / 0.3934693 = -1.5414940.
    x = -50: f = log1p(-e^-50) = -1.9287e-22, f' = -1.9287e-22.
    x = 0: capped at -tiny (1.1755e-38): f = log(1.1755e-38) = -87.3365, f' = 0 (capped)."""
    x = torch.tensor([0.0, -1e-9, -0.5, -50.0], requires_grad=True)
    y = L.log1mexp(x)
    y.sum().backward()
    torch.testing.assert_close(
        y.detach(),
        torch.tensor([-87.33655, -20.723267, -0.9327521, -1.9287499e-22]),
        rtol=1e-6,
        atol=0,
    )
    torch.testing.assert_close(
        x.grad, torch.tensor([0.0, -1e9, -1.5414940, -1.9287499e-22]), rtol=1e-5, atol=0
    )
    # ORPO with a chosen mean log-prob of exactly 0 (a confident model): a finite step.
    c, r = torch.tensor([0.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    (-c + L.orpo_loss(c, r, lam=1.0)).sum().backward()
    assert torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()
    assert float(c.grad) == pytest.approx(-1.0, abs=1e-6)  # the NLL term's, the odds term ~0


def test_simpo_by_hand():
    """beta = 2, gamma = 0.5, c = -1, r = -2: 2 * 1 - 0.5 = 1.5, -log sigma(1.5) = log(1 + e^-1.5)
    = 0.2014133; c == r with gamma = 0: log 2."""
    losses = L.simpo_loss(
        torch.tensor([-1.0, -0.7]), torch.tensor([-2.0, -0.7]), beta=2.0, gamma=0.5
    )
    _close(losses[:1], [math.log1p(math.exp(-1.5))])
    _close(L.simpo_loss(torch.tensor([-0.7]), torch.tensor([-0.7]), beta=2.0, gamma=0.0), [LOG2])
    with pytest.raises(ValueError, match="beta"):
        L.simpo_loss(torch.tensor([0.0]), torch.tensor([0.0]), beta=0.0, gamma=0.0)


def test_loss_aggregations_by_hand():
    """Token losses [1, 2, 3] (3 tokens) and [6] (1 token), max_new_tokens 4; NaN where
    masked out must not leak in.
    token_mean: (1 + 2 + 3 + 6) / 4 = 3; seq_mean_token_mean: (2 + 6) / 2 = 4;
    seq_sum_norm: 12 / (2 x 4) = 1.5. Split in two micro-batches, totals and weights add up."""
    nan = float("nan")
    losses = torch.tensor([[1.0, 2.0, 3.0, nan], [6.0, nan, nan, nan]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    expected = {"token_mean": 3.0, "seq_mean_token_mean": 4.0, "seq_sum_norm": 1.5}
    for mode, value in expected.items():
        total, weight = L.aggregate_loss(losses, mask, mode, max_new_tokens=4)
        _close(total / weight, value)
        parts = [L.aggregate_loss(losses[i : i + 1], mask[i : i + 1], mode, 4) for i in (0, 1)]
        _close(sum(t for t, _ in parts) / sum(w for _, w in parts), value)
    with pytest.raises(ValueError, match="loss aggregation"):
        L.aggregate_loss(losses, mask, "mean")


def test_clip_higher_widens_only_the_upper_range():
    """A = 1, ratio 1.25: clip_eps 0.2 clips it at 1.2 (loss -1.2, no gradient); with
    clip_eps_high 0.28 it is inside (loss -1.25, gradient -1.25). A = -1, ratio 0.75: the
    lower range (0.8) clips it either way (loss max(0.75, 0.8) = 0.8, no gradient)."""
    for high, loss, grad in ((None, -1.2, 0.0), (0.28, -1.25, -1.25)):
        logp = torch.tensor([[math.log(1.25)]], requires_grad=True)
        out, stats = L.clipped_policy_loss(
            logp, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1), 0.2, high
        )
        _close(out, loss)
        out.backward()
        _close(logp.grad, [[grad]])
        _close(stats["clipfrac"], 1.0 if high is None else 0.0)
    logp = torch.tensor([[math.log(0.75)]], requires_grad=True)
    out, _ = L.clipped_policy_loss(
        logp, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1), 0.2, 0.28
    )
    _close(out, 0.8)
    out.backward()
    _close(logp.grad, [[0.0]])


def test_sequence_level_importance_ratio_gspo():
    """Token ratios 1.1 and 0.9 (A = 1, one response): GSPO's ratio is exp(mean log ratio) =
    sqrt(0.99) for both tokens, so each token's gradient is -sqrt(0.99) / 2 (token level:
    -1.1 / 2 and -0.9 / 2). Token ratios 1.5 and 1.0: sqrt(1.5) = 1.2247 > 1.2, clipped per
    response: loss -1.2 and no gradient to either token (token level would clip one)."""
    old = torch.zeros(1, 2)
    one = torch.ones(1, 2)
    logp = torch.log(torch.tensor([[1.1, 0.9]])).requires_grad_()
    out, _ = L.clipped_policy_loss(logp, old, torch.tensor([1.0]), one, 0.2, None, "sequence")
    _close(out, -math.sqrt(0.99))
    out.backward()
    _close(logp.grad, [[-math.sqrt(0.99) / 2] * 2])
    logp = torch.log(torch.tensor([[1.5, 1.0]])).requires_grad_()
    out, stats = L.clipped_policy_loss(logp, old, torch.tensor([1.0]), one, 0.2, None, "sequence")
    _close(out, -1.2)
    out.backward()
    _close(logp.grad, [[0.0, 0.0]])
    _close(stats["clipfrac"], 1.0)
    token, _ = L.clipped_policy_loss(logp.detach(), old, torch.tensor([1.0]), one, 0.2)
    _close(token, (-1.2 - 1.0) / 2)


def test_gspo_needs_one_term_per_response():
    """GSPO's objective (Zheng et al. 2025) is the mean over the G responses of
    min(s_i A_i, clip(s_i) A_i), s_i = exp(mean token log-ratio of response i). Two responses of
    3 and 1 tokens (ratios inside the clip range), A = (1, -0.5): seq_mean_token_mean gives that
    objective's gradient; token_mean weights response i by |y_i| / 4 instead of 1 / 2, so the
    long response's gradient is 1.5x the paper's and the short one's 0.5x (the config warns)."""
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -0.5])
    start = torch.tensor([[0.05, -0.02, 0.03], [0.04, 0.0, 0.0]])

    def grad(loss_fn):
        logp = start.clone().requires_grad_()
        loss_fn(logp).backward()
        return logp.grad

    def paper(logp):
        s = torch.exp((logp * mask).sum(-1) / mask.sum(-1))
        return -torch.minimum(s * adv, s.clamp(0.8, 1.2) * adv).mean()

    def ours(agg):
        return lambda logp: L.clipped_policy_loss(
            logp, old, adv, mask, 0.2, None, "sequence", loss_agg=agg
        )[0]

    want = grad(paper)
    torch.testing.assert_close(grad(ours("seq_mean_token_mean")), want, rtol=1e-6, atol=1e-9)
    token = grad(ours("token_mean"))
    _close(token[0] / want[0], [1.5] * 3)
    _close(token[1, :1] / want[1, :1], [0.5])
    from rlhf_cli.config import GrpoConfig

    assert (
        GrpoConfig(importance_level="sequence")
        .notes()[0]
        .endswith("stage.loss_agg=seq_mean_token_mean")
    )
    assert GrpoConfig(importance_level="sequence", loss_agg="seq_mean_token_mean").notes() == []
    assert GrpoConfig().notes() == []


def test_kl_estimators_as_loss_terms_by_exact_enumeration():
    """A term k(log pi(y), log ref(y)) in the loss, on samples y ~ pi (gradient through log pi
    only), has the expected gradient sum_y pi(y) grad k. Enumerating a 3-token vocabulary:
    k1's is 0 (no regularisation: grpo refuses it), k2's is grad KL(pi || ref), k3's is
    grad KL(ref || pi)."""
    theta0 = torch.tensor([0.3, -1.2, 0.8], dtype=torch.float64)
    log_ref = torch.log(torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64))

    def grad(f):
        theta = theta0.clone().requires_grad_()
        f(theta).backward()
        return theta.grad

    def expected(est):
        def f(theta):
            logp = torch.log_softmax(theta, -1)
            return (logp.exp().detach() * L.kl_penalty(logp, log_ref, est)).sum()

        return grad(f)

    def kl(p_log, q_log):
        return (p_log.exp() * (p_log - q_log)).sum()

    torch.testing.assert_close(expected("k1"), torch.zeros(3, dtype=torch.float64))
    forward = grad(lambda t: kl(torch.log_softmax(t, -1), log_ref))
    reverse = grad(lambda t: kl(log_ref, torch.log_softmax(t, -1)))
    assert forward.abs().min() > 1e-2 and (forward - reverse).abs().max() > 1e-2
    torch.testing.assert_close(expected("k2"), forward)
    torch.testing.assert_close(expected("k3"), reverse)


def test_tis_weights_by_hand():
    """min(exp(old - engine), cap) per token, 1 outside the mask; the mismatch statistics over
    the masked tokens only (the masked-out token has the largest gap, 1.0)."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.1, -3.0]])
    engine = torch.tensor([[-1.0, -2.5, 0.5], [-0.1, -0.1, -3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    weights, stats = L.tis_weights(old, engine, mask, cap=1.5)
    # ratios: e^0 = 1, e^0.5 = 1.6487 -> capped 1.5, (masked: 1), e^-0.1 = 0.904837, 1, 1
    expected = torch.tensor([[1.0, 1.5, 1.0], [math.exp(-0.1), 1.0, 1.0]])
    assert torch.allclose(weights, expected, atol=1e-6)
    assert float(stats["logprob_diff_mean"]) == pytest.approx(0.6 / 5, abs=1e-6)
    assert float(stats["logprob_diff_max"]) == pytest.approx(0.5, abs=1e-6)
    assert float(stats["tis_clipped"]) == pytest.approx(1 / 5, abs=1e-6)
    # No cap (inf): the plain ratio.
    weights, _ = L.tis_weights(old, engine, mask, cap=float("inf"))
    assert float(weights[0, 1]) == pytest.approx(math.exp(0.5), abs=1e-5)


def test_truncated_logps_by_hand():
    """The log-prob of a token under vLLM's truncated sampling distribution, on probabilities
    p = (0.4, 0.3, 0.15, 0.1, 0.05) (logits log p): min_p 0.3 keeps p >= 0.12 (three tokens,
    mass 0.85); top_k 2 keeps two (mass 0.7); top_p 0.8 drops the tail whose cumulative mass is
    <= 0.2 (0.05 and 0.1: mass 0.85 left); a token outside the kept set is -inf; nothing set:
    the plain log-prob."""
    p = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    z = p.log().expand(4, 5)
    tokens = torch.tensor([0, 1, 2, 3])
    plain = L.truncated_logps(z, tokens)
    torch.testing.assert_close(plain, p[:4].log())
    got = L.truncated_logps(z, tokens, min_p=0.3)
    torch.testing.assert_close(got[:3], (p[:3] / 0.85).log())
    assert got[3] == float("-inf")
    got = L.truncated_logps(z, tokens, top_k=2)
    torch.testing.assert_close(got[:2], (p[:2] / 0.7).log())
    assert got[2] == float("-inf") and got[3] == float("-inf")
    got = L.truncated_logps(z, tokens, top_p=0.8)
    torch.testing.assert_close(got[:3], (p[:3] / 0.85).log())
    assert got[3] == float("-inf")
    # top_k and top_p together (top_k first): top 3 -> mass 0.85, renormalised
    # (0.47, 0.35, 0.18); top_p 0.7 drops the 0.18 (cumulative 0.18 <= 0.3): mass 0.7 left.
    got = L.truncated_logps(z, tokens, top_k=3, top_p=0.7)
    torch.testing.assert_close(got[:2], (p[:2] / 0.7).log())
    assert got[2] == float("-inf")
