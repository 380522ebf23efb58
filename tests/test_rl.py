"""fastft.rl: the RLHF losses against plain-torch reimplementations (and the fused log-probs against
log_softmax(h @ W.T).gather on every CPU backend, fp32 and bf16 under the 2x-torch-error rule)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastft import backend, rl

BACKENDS = ["reference", "cpp", "triton"]


def stock_logprobs(hidden, weight, targets, temperature=1.0):
    logits = (hidden.float() @ weight.float().T) / temperature
    logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets == -100, torch.zeros_like(logp), logp)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_log_softmax_gather_fp32(name, temperature):
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 24, requires_grad=True)
    weight = torch.randn(101, 24, requires_grad=True)
    targets = torch.randint(0, 101, (3, 7))
    targets[0, :2] = -100
    with backend.use(name):
        got = rl.token_logprobs(hidden, weight, targets, temperature=temperature)
        (got * torch.linspace(-1, 1, 7)).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    want = stock_logprobs(hidden, weight, targets, temperature)
    (want * torch.linspace(-1, 1, 7)).sum().backward()
    assert got.dtype == torch.float32 and got.shape == targets.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], hidden.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[1], weight.grad, atol=1e-5, rtol=1e-4)
    assert torch.all(got[0, :2] == 0)


@pytest.mark.parametrize("name", BACKENDS)
def test_token_logprobs_bf16_within_twice_torch_error(name):
    torch.manual_seed(1)
    hidden = torch.randn(64, 48)
    weight = torch.randn(257, 48) * 0.3
    targets = torch.randint(0, 257, (64,))
    truth = stock_logprobs(hidden.double(), weight.double(), targets).double()
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    torch_err = (torch.log_softmax((hb @ wb.T), -1).gather(-1, targets[:, None]).squeeze(-1).double() - truth).abs().max()
    with backend.use(name):
        got = rl.token_logprobs(hb, wb, targets)
    assert (got.double() - truth).abs().max() <= 2 * torch_err + 1e-2


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_token_logprobs_with_entropy_match_torch(name, softcap):
    """return_entropy=True: (logp, entropy) of log_softmax(softcap(h @ W.T) / T), both differentiable (an entropy
    bonus), through the cap too (Gemma-2/3 heads)."""
    torch.manual_seed(2)
    hidden = torch.randn(3, 7, 24, requires_grad=True)
    weight = torch.randn(101, 24, requires_grad=True)
    targets = torch.randint(0, 101, (3, 7))
    targets[0, :2] = -100
    upstream = torch.linspace(-1, 1, 7)

    def loss(logp, entropy):
        return (logp * upstream).sum() - 0.1 * entropy.sum()

    with backend.use(name):
        logp, entropy = rl.token_logprobs(hidden, weight, targets, temperature=0.7, softcap=softcap,
                                          return_entropy=True)
        loss(logp, entropy).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = hidden @ weight.T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / 0.7
    counted = targets != -100
    want_entropy = torch.where(counted, torch.distributions.Categorical(logits=logits).entropy(), 0.0)
    want_logp = torch.where(counted, torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0)[..., None])[..., 0],
                            0.0)
    loss(want_logp, want_entropy).backward()
    assert logp.dtype == entropy.dtype == torch.float32 and entropy.shape == targets.shape
    torch.testing.assert_close(logp, want_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, want_entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], hidden.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[1], weight.grad, atol=1e-5, rtol=1e-4)


def test_token_logprobs_rejects_bad_temperature_and_softcap():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        rl.token_logprobs(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]), temperature=0)
    for return_entropy in (False, True):
        with pytest.raises(ValueError, match="softcap must be > 0 or None"):
            rl.token_logprobs(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]), softcap=-1.0,
                              return_entropy=return_entropy)


def plain_gae(rewards, values, mask, gamma, lam):
    """Per sequence, over its counted tokens only, textbook recursion."""
    adv = torch.zeros_like(values)
    for b in range(values.shape[0]):
        idx = mask[b].nonzero().flatten().tolist()
        running, next_v = 0.0, 0.0
        for t in reversed(idx):
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            running = delta + gamma * lam * running
            adv[b, t] = running
            next_v = values[b, t]
    return adv, (adv + values) * mask


def test_gae_matches_the_textbook_recursion():
    torch.manual_seed(2)
    rewards, values = torch.randn(4, 9, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    mask = torch.zeros(4, 9, dtype=torch.float64)
    for b, (start, end) in enumerate([(0, 9), (2, 7), (3, 4), (1, 8)]):
        mask[b, start:end] = 1
    adv, ret = rl.gae(rewards, values, mask, gamma=0.99, lam=0.9)
    want_adv, want_ret = plain_gae(rewards, values, mask, 0.99, 0.9)
    torch.testing.assert_close(adv, want_adv)
    torch.testing.assert_close(ret, want_ret)
    # lam = 1, gamma = 1: advantage = sum of the remaining rewards - value
    adv, _ = rl.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    rest = (rewards * mask).flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(adv, (rest - values) * mask)


def test_ppo_policy_loss_clips_and_reports():
    torch.manual_seed(3)
    old = torch.randn(2, 5, dtype=torch.float64)
    new = (old + torch.tensor([0.5, -0.5, 0.01, 0.3, -0.02]).expand(2, 5)).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0], [-1.0, 1.0, 1.0, 1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.float64)
    mask[1, 4] = 0
    loss, stats = rl.ppo_policy_loss(new, old, adv, mask, clip_range=0.2)
    ratio = torch.exp(new - old)
    want = torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    torch.testing.assert_close(loss, (want * mask).sum() / mask.sum())
    clipped = (-adv * ratio.clamp(0.8, 1.2) > -adv * ratio).double()
    assert stats.clip_fraction == pytest.approx(float((clipped * mask).sum() / mask.sum()))
    assert stats.clip_fraction > 0
    loss.backward()
    # a token clipped on the binding side passes no gradient
    assert new.grad[0, 0] == 0 and new.grad[0, 2] != 0


def test_value_loss_clipped_and_plain():
    v = torch.tensor([[1.0, 2.0, 0.0]], requires_grad=True)
    old = torch.tensor([[0.0, 2.1, 0.0]])
    ret = torch.tensor([[0.5, 3.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss = rl.value_loss(v, old, ret, mask, clip_range=0.2)
    clipped = old + (v - old).clamp(-0.2, 0.2)
    want = 0.5 * (torch.max((v - ret) ** 2, (clipped - ret) ** 2) * mask).sum() / 2
    torch.testing.assert_close(loss, want)
    plain = rl.value_loss(v, old, ret, mask, clip_range=None)
    torch.testing.assert_close(plain, 0.5 * (((v - ret) ** 2) * mask).sum() / 2)


def test_explained_variance_against_numpy_and_its_limits():
    torch.manual_seed(0)
    ret = torch.randn(3, 9, dtype=torch.float64)
    mask = torch.rand(3, 9) > 0.3
    values = ret + 0.5 * torch.randn(3, 9, dtype=torch.float64)
    r, v = ret[mask].numpy(), values[mask].numpy()
    assert rl.explained_variance(values, ret, mask) == pytest.approx(1 - np.var(r - v) / np.var(r), rel=1e-9)
    assert rl.explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert rl.explained_variance(torch.full_like(ret, 7.0), ret, mask) == pytest.approx(0.0, abs=1e-12)
    assert rl.explained_variance(-ret, ret, mask) < 0  # worse than a constant
    values[~mask] = 1e6  # uncounted tokens are not read
    assert rl.explained_variance(values, ret, mask) == pytest.approx(1 - np.var(r - v) / np.var(r), rel=1e-9)
    assert math.isnan(rl.explained_variance(values, torch.ones_like(ret), mask))
    with pytest.raises(ValueError, match="shapes must match"):
        rl.explained_variance(values[:, :4], ret, mask)


def test_adaptive_kl_controller_moves_towards_the_target():
    ctl = rl.AdaptiveKLController(0.1, target=6.0, horizon=100)
    assert ctl.update(12.0, n_steps=10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    coef = ctl.coef
    assert ctl.update(3.0, n_steps=10) == pytest.approx(coef * (1 - 0.2 * 10 / 100))
    state = ctl.state_dict()
    other = rl.AdaptiveKLController(1.0, target=6.0)
    other.load_state_dict(state)
    assert other.coef == ctl.coef
    with pytest.raises(ValueError):
        rl.AdaptiveKLController(0.1, target=0.0)


@pytest.mark.parametrize("loss_type", rl.DPO_LOSS_TYPES)
def test_dpo_loss_matches_the_papers_formulas(loss_type):
    torch.manual_seed(4)
    pc, pr, rc, rr = (torch.randn(6, dtype=torch.float64) * 5 for _ in range(4))
    tokens_c, tokens_r = torch.tensor([3., 4, 5, 6, 7, 8]), torch.tensor([2., 2, 9, 1, 4, 4])
    beta = 0.1
    loss, chosen_reward, rejected_reward = rl.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                                                       label_smoothing=0.1 if loss_type == "sigmoid" else 0.0,
                                                       chosen_tokens=tokens_c, rejected_tokens=tokens_r)
    delta = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        want = (-F.logsigmoid(beta * delta) * 0.9 - F.logsigmoid(-beta * delta) * 0.1).mean()
    elif loss_type == "hinge":
        want = torch.relu(1 - beta * delta).mean()
    else:
        want = (((pc - rc) / tokens_c - (pr - rr) / tokens_r - 1 / (2 * beta)) ** 2).mean()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(chosen_reward, beta * (pc - rc))
    torch.testing.assert_close(rejected_reward, beta * (pr - rr))


def test_dpo_loss_bad_options():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        rl.dpo_loss(x, x, x, x, loss_type="nope")
    with pytest.raises(ValueError, match="ipo"):
        rl.dpo_loss(x, x, x, x, loss_type="ipo")
    with pytest.raises(ValueError, match="shapes must match"):
        rl.dpo_loss(x, torch.zeros(3), x, x)


def test_bradley_terry_loss():
    c, r = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.5, -3.0])
    torch.testing.assert_close(rl.bradley_terry_loss(c, r), -F.logsigmoid(c - r).mean())
    m = torch.tensor([0.5, 0.0, 1.0])
    torch.testing.assert_close(rl.bradley_terry_loss(c, r, margin=m), -F.logsigmoid(c - r - m).mean())


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("mode", rl.DISTILLATION_MODES)
def test_distillation_loss_matches_kl_div_on_full_logits(name, mode):
    torch.manual_seed(5)
    hs = torch.randn(2, 5, 16, requires_grad=True)
    ws = torch.randn(97, 16, requires_grad=True)
    ht, wt = torch.randn(2, 5, 20), torch.randn(97, 20)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    with backend.use(name):
        got = rl.distillation_loss(hs, ws, ht, wt, mode=mode, mix=0.3, mask=mask)
        got.backward()
    grads = hs.grad.clone(), ws.grad.clone()
    hs.grad = ws.grad = None
    log_s = torch.log_softmax(hs @ ws.T, -1)[mask]
    log_t = torch.log_softmax(ht @ wt.T, -1)[mask]
    forward = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")   # KL(teacher || student)
    reverse = F.kl_div(log_t, log_s, log_target=True, reduction="batchmean")   # KL(student || teacher)
    want = {"forward": forward, "reverse": reverse, "mixed": 0.3 * forward + 0.7 * reverse}[mode]
    want.backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], hs.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[1], ws.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("mix", [0.0, 0.3, 1.0])
def test_distillation_mixed_is_one_linear_full_kl_pass(name, mix, monkeypatch):
    """mode="mixed" makes ONE linear_full_kl call (teacher as its policy, reverse_weight = 1 - mix): values and
    student gradients equal the fp64 truth mix * KL(teacher || student) + (1 - mix) * KL(student || teacher),
    the teacher gets no gradient, and mix = 1 / 0 equal the forward / reverse modes."""
    calls = []
    real = rl.linear_full_kl
    monkeypatch.setattr(rl, "linear_full_kl", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    g = torch.Generator().manual_seed(9)
    hs = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    ws = (torch.randn(1000, 16, generator=g) * 0.3).requires_grad_()
    ht = torch.randn(3, 7, 20, generator=g, requires_grad=True)
    wt = (torch.randn(1000, 20, generator=g) * 0.3).requires_grad_()
    mask = torch.rand(3, 7, generator=g) > 0.3
    with backend.use(name):
        got = rl.distillation_loss(hs, ws, ht, wt, mode="mixed", mix=mix, mask=mask, temperature=0.9)
        got.backward()
    assert len(calls) == 1 and calls[0]["reverse_weight"] == pytest.approx(1.0 - mix)
    assert ht.grad is None and wt.grad is None
    S = [t.detach().double().requires_grad_() for t in (hs, ws)]
    log_s = torch.log_softmax((S[0] @ S[1].T)[mask] / 0.9, -1)
    log_t = torch.log_softmax((ht.detach().double() @ wt.detach().double().T)[mask] / 0.9, -1)
    forward = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    reverse = (log_s.exp() * (log_s - log_t)).sum(-1).mean()
    want = mix * forward + (1 - mix) * reverse
    want.backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hs.grad.double(), S[0].grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ws.grad.double(), S[1].grad, rtol=1e-4, atol=1e-6)
    if mix in (0.0, 1.0):
        with backend.use(name):
            same = rl.distillation_loss(hs, ws, ht, wt, mode="forward" if mix == 1.0 else "reverse", mask=mask,
                                        temperature=0.9)
        torch.testing.assert_close(same, got, rtol=1e-6, atol=1e-7)
