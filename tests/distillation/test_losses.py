"""Tests for minicompress.distillation.losses against naive float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from minicompress.distillation import losses as L
from minicompress.hardware import cpp_compiler


# --------------------------------------------------------------------------
# naive float64 references (explicit per-token loops, softmax by exp / sum)
# --------------------------------------------------------------------------
def _softmax(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(x - x.max())
    return e / e.sum()


def _rows(n, mask):
    return [i for i in range(n) if mask is None or bool(mask[i])]


def ref_forward_kl(s, t, tau=1.0, mask=None):
    vals = []
    for i in _rows(s.shape[0], mask):
        p = _softmax(t[i] / tau)
        q = _softmax(s[i] / tau)
        vals.append((p * torch.log(p / q)).sum())
    return torch.stack(vals).mean() * tau**2


def ref_reverse_kl(s, t, tau=1.0, mask=None):
    vals = []
    for i in _rows(s.shape[0], mask):
        p = _softmax(t[i] / tau)
        q = _softmax(s[i] / tau)
        vals.append((q * torch.log(q / p)).sum())
    return torch.stack(vals).mean() * tau**2


def ref_jsd(s, t, beta=0.5, tau=1.0, mask=None):
    vals = []
    for i in _rows(s.shape[0], mask):
        p = _softmax(t[i] / tau)
        q = _softmax(s[i] / tau)
        m = beta * p + (1 - beta) * q
        vals.append(beta * (p * torch.log(p / m)).sum() + (1 - beta) * (q * torch.log(q / m)).sum())
    return torch.stack(vals).mean() * tau**2


def ref_topk_kl(s, tv, ti, tau=1.0, mask=None):
    vals = []
    for i in _rows(s.shape[0], mask):
        p = _softmax(tv[i] / tau)  # renormalised over the k entries
        q_full = _softmax(s[i] / tau)
        q = torch.stack([q_full[int(j)] for j in ti[i]])
        vals.append((p * torch.log(p / q)).sum())
    return torch.stack(vals).mean() * tau**2


def ref_ce(x, y, ignore_index=-100):
    vals = []
    for i in range(x.shape[0]):
        if int(y[i]) == ignore_index:
            continue
        vals.append(-torch.log(_softmax(x[i])[int(y[i])]))
    return torch.stack(vals).mean()


def ref_softcap(x, cap):
    return x if cap is None else cap * torch.tanh(x / cap)


def _logits(n, v, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale


def _mask(n, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(n, generator=g) > 0.3
    m[0] = True
    m[-1] = False
    return m


def _grad_pair(fn_ours, fn_ref, s, *rest):
    """Value and d/d(student logits) of ours (float32) and ref (float64)."""
    s32 = s.clone().float().requires_grad_(True)
    out = fn_ours(s32, *[r.float() if r.is_floating_point() else r for r in rest])
    out.backward()
    s64 = s.clone().double().requires_grad_(True)
    ref = fn_ref(s64, *[r.double() if r.is_floating_point() else r for r in rest])
    ref.backward()
    return out, s32.grad, ref, s64.grad


# --------------------------------------------------------------------------
# per-token divergences
# --------------------------------------------------------------------------
CASES = [(7, 50, 1.0, False, 0), (13, 300, 2.0, True, 1), (9, 128, 1.0, True, 2), (11, 77, 0.7, False, 3)]


@pytest.mark.parametrize("n,v,tau,use_mask,seed", CASES)
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl"])
def test_kl_matches_naive(name, n, v, tau, use_mask, seed):
    s, t = _logits(n, v, seed), _logits(n, v, seed + 100)
    mask = _mask(n, seed) if use_mask else None
    ours_fn = getattr(L, name)
    ref_fn = ref_forward_kl if name == "forward_kl" else ref_reverse_kl
    out, g, ref, g_ref = _grad_pair(
        lambda a, b: ours_fn(a, b, temperature=tau, mask=mask),
        lambda a, b: ref_fn(a, b, tau, mask),
        s, t,
    )
    assert out.dtype == torch.float32 and out.dim() == 0
    assert out.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(g, g_ref.float(), rtol=1e-4, atol=1e-7)
    if use_mask:  # masked-out tokens get no gradient
        assert torch.all(g[~mask] == 0)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("n,v,tau,use_mask,seed", CASES[:2])
def test_jsd_matches_naive(beta, n, v, tau, use_mask, seed):
    s, t = _logits(n, v, seed), _logits(n, v, seed + 100)
    mask = _mask(n, seed) if use_mask else None
    if beta == 0.0:
        ref_fn = lambda a, b: ref_forward_kl(a, b, tau, mask)  # noqa: E731
    elif beta == 1.0:
        ref_fn = lambda a, b: ref_reverse_kl(a, b, tau, mask)  # noqa: E731
    else:
        ref_fn = lambda a, b: ref_jsd(a, b, beta, tau, mask)  # noqa: E731
    out, g, ref, g_ref = _grad_pair(
        lambda a, b: L.generalized_jsd(a, b, beta=beta, temperature=tau, mask=mask), ref_fn, s, t
    )
    assert out.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(g, g_ref.float(), rtol=1e-4, atol=1e-7)


def test_jsd_limits_and_symmetry():
    s, t = _logits(10, 64, 5), _logits(10, 64, 6)
    assert torch.isclose(L.generalized_jsd(s, t, beta=0.0), L.forward_kl(s, t))
    assert torch.isclose(L.generalized_jsd(s, t, beta=1.0), L.reverse_kl(s, t))
    # symmetric at beta = 0.5
    a = L.generalized_jsd(s, t, beta=0.5, temperature=2.0)
    b = L.generalized_jsd(t, s, beta=0.5, temperature=2.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    # JSD(beta)/beta -> forward KL, JSD(beta)/(1-beta) -> reverse KL; no NaN near the ends
    for beta in (1e-7, 1 - 1e-7):  # float32 path stays finite close to the ends
        assert torch.isfinite(L.generalized_jsd(s, t, beta=beta))
    eps = 1e-7
    s64, t64 = s.double() / 3, t.double() / 3  # float64 inputs are computed in float64
    lo = L.generalized_jsd(s64, t64, beta=eps)
    hi = L.generalized_jsd(s64, t64, beta=1 - eps)
    assert lo.dtype == torch.float64
    assert (lo / eps).item() == pytest.approx(L.forward_kl(s64, t64).item(), rel=1e-4)
    assert (hi / eps).item() == pytest.approx(L.reverse_kl(s64, t64).item(), rel=1e-4)
    with pytest.raises(ValueError):
        L.generalized_jsd(s, t, beta=1.5)


@pytest.mark.parametrize("n,v,tau,use_mask,seed", CASES)
def test_topk_kl_matches_naive(n, v, tau, use_mask, seed):
    s, t = _logits(n, v, seed), _logits(n, v, seed + 100)
    mask = _mask(n, seed) if use_mask else None
    tv, ti = t.topk(8, dim=-1)
    out, g, ref, g_ref = _grad_pair(
        lambda a, b: L.topk_kl(a, b, ti, temperature=tau, mask=mask),
        lambda a, b: ref_topk_kl(a, b, ti, tau, mask),
        s, tv,
    )
    assert out.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(g, g_ref.float(), rtol=1e-4, atol=1e-7)


def test_topk_with_full_k_equals_forward_kl():
    s, t = _logits(9, 60, 7), _logits(9, 60, 8)
    tv, ti = t.topk(60, dim=-1)
    for tau in (1.0, 2.0):
        a = L.topk_kl(s, tv, ti, temperature=tau)
        b = L.forward_kl(s, t, temperature=tau)
        assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-7)


def test_self_divergence_is_zero():
    x = _logits(12, 100, 9)
    for tau in (1.0, 2.0):
        assert abs(L.forward_kl(x, x, temperature=tau).item()) < 1e-6
        assert abs(L.reverse_kl(x, x, temperature=tau).item()) < 1e-6
        for beta in (0.0, 0.3, 0.5, 1.0):
            assert abs(L.generalized_jsd(x, x, beta=beta, temperature=tau).item()) < 1e-6
        tv, ti = x.topk(100, dim=-1)
        assert abs(L.topk_kl(x, tv, ti, temperature=tau).item()) < 1e-6


def test_neg_inf_logits_no_nan():
    s, t = _logits(6, 40, 10), _logits(6, 40, 11)
    s[:, -5:] = -math.inf
    t[:, -5:] = -math.inf
    for fn in (L.forward_kl, L.reverse_kl, lambda a, b: L.generalized_jsd(a, b, beta=0.3)):
        s_ = s.clone().requires_grad_(True)
        out = fn(s_, t)
        out.backward()
        assert torch.isfinite(out)
        assert torch.isfinite(s_.grad).all()
        ref = ref_forward_kl(s[:, :-5].double(), t[:, :-5].double()) if fn is L.forward_kl else None
        if ref is not None:
            assert out.item() == pytest.approx(ref.item(), rel=1e-5)


def test_low_precision_inputs_computed_in_float32():
    s, t = _logits(8, 70, 12), _logits(8, 70, 13)
    sb, tb = s.bfloat16(), t.bfloat16()
    out = L.forward_kl(sb, tb, temperature=2.0)
    assert out.dtype == torch.float32
    ref = ref_forward_kl(sb.double(), tb.double(), 2.0)
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)


def test_cross_entropy_and_softcap():
    x = _logits(11, 90, 14)
    y = torch.randint(0, 90, (11,), generator=torch.Generator().manual_seed(0))
    y[[2, 5]] = -100
    x32 = x.clone().requires_grad_(True)
    out = L.cross_entropy(x32, y)
    out.backward()
    x64 = x.double().requires_grad_(True)
    ref = ref_ce(x64, y)
    ref.backward()
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(x32.grad, x64.grad.float(), rtol=1e-4, atol=1e-7)
    assert L.cross_entropy(x, torch.full((11,), -100)).item() == 0.0
    # softcap
    assert L.softcap(x, None) is x
    torch.testing.assert_close(L.softcap(x, 5.0), 5.0 * torch.tanh(x / 5.0))
    assert L.softcap(x * 100, 3.0).abs().max() <= 3.0


def test_empty_mask_gives_zero():
    s, t = _logits(5, 20, 15), _logits(5, 20, 16)
    m = torch.zeros(5, dtype=torch.bool)
    assert L.forward_kl(s, t, mask=m).item() == 0.0


# --------------------------------------------------------------------------
# chunked fused lm_head + loss
# --------------------------------------------------------------------------
N, H, HT, V = 13, 16, 24, 97


def _setup(seed=0, dtype=torch.float32, ignore=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.5
    th = torch.randn(N, HT, generator=g)
    tw = torch.randn(V, HT, generator=g) * 0.5
    labels = torch.randint(0, V, (N,), generator=g)
    if ignore:
        labels[[0, 4, 5, 11]] = -100
    return h.to(dtype), w.to(dtype), th.to(dtype), tw.to(dtype), labels


def _ref_total(h, w, th, tw, labels, *, kind="forward_kl", kl_weight=1.0, ce_weight=0.0,
               tau=1.0, beta=0.5, scap=None, tcap=None, topk=None):
    """Naive float64: full [N, V] logits + the reference divergences."""
    z = ref_softcap(h @ w.t(), scap)
    mask = labels != -100 if labels is not None else None
    total = torch.zeros((), dtype=torch.float64)
    if kl_weight:
        if topk is not None:
            total = total + kl_weight * ref_topk_kl(z, topk[0].double(), topk[1], tau, mask)
        else:
            zt = ref_softcap(th @ tw.t(), tcap)
            if kind == "forward_kl":
                kl = ref_forward_kl(z, zt, tau, mask)
            elif kind == "reverse_kl":
                kl = ref_reverse_kl(z, zt, tau, mask)
            else:
                kl = ref_jsd(z, zt, beta, tau, mask)
            total = total + kl_weight * kl
    if ce_weight:
        total = total + ce_weight * ref_ce(z, labels)
    return total


def _compare(h, w, teacher, labels, *, loss=L.LogitLoss(), numerics=L.LossNumerics(), student_softcap=None,
             rtol=1e-5, atol=1e-6, grad_rtol=1e-4, grad_atol=1e-6, ref_kwargs=None):
    ref_kwargs = ref_kwargs or {}
    h_ = h.clone().requires_grad_(True)
    w_ = w.clone().requires_grad_(True)
    out = L.chunked_distill_loss(h_, w_, teacher, labels=labels, loss=loss, numerics=numerics,
                                 student_softcap=student_softcap)
    out.backward()
    h64 = h.double().requires_grad_(True)
    w64 = w.double().requires_grad_(True)
    live = teacher is not None and teacher.hidden is not None
    th64 = teacher.hidden.double() if live else None
    tw64 = teacher.weight.double() if live else None
    ref = _ref_total(h64, w64, th64, tw64, labels, **ref_kwargs)
    ref.backward()
    assert out.dtype == torch.float32 and out.dim() == 0
    assert out.item() == pytest.approx(ref.item(), rel=rtol, abs=atol)
    assert h_.grad.dtype == h.dtype and w_.grad.dtype == w.dtype
    torch.testing.assert_close(h_.grad.double(), h64.grad, rtol=grad_rtol, atol=grad_atol)
    torch.testing.assert_close(w_.grad.double(), w64.grad, rtol=grad_rtol, atol=grad_atol)
    return out


@pytest.mark.parametrize("chunk_size", [1, 3, N, None])
@pytest.mark.parametrize("kind,tau", [("forward_kl", 1.0), ("reverse_kl", 2.0), ("jsd", 1.0), ("jsd", 2.0)])
def test_chunked_matches_naive(kind, tau, chunk_size):
    h, w, th, tw, labels = _setup(1)
    _compare(h, w, L.TeacherTargets(th, tw), labels, loss=L.LogitLoss(kind=kind, temperature=tau, beta=0.3),
             numerics=L.LossNumerics(chunk_size=chunk_size), ref_kwargs=dict(kind=kind, tau=tau, beta=0.3))


@pytest.mark.parametrize("chunk_size", [1, 3, N, None])
def test_chunked_with_ce_and_softcap(chunk_size):
    h, w, th, tw, labels = _setup(2)
    _compare(h, w, L.TeacherTargets(th, tw, softcap=6.0), labels,
             loss=L.LogitLoss(kl_weight=0.7, ce_weight=0.4, temperature=2.0),
             numerics=L.LossNumerics(chunk_size=chunk_size), student_softcap=4.0,
             ref_kwargs=dict(kl_weight=0.7, ce_weight=0.4, tau=2.0, scap=4.0, tcap=6.0))


@pytest.mark.parametrize("chunk_size", [1, 3, N, None])
def test_chunked_with_teacher_topk(chunk_size):
    h, w, th, tw, labels = _setup(3)
    tv, ti = (th @ tw.t()).topk(10, dim=-1)
    for kind in ("forward_kl", "topk_kl"):  # forward_kl + teacher_topk -> topk_kl
        _compare(h, w, L.TeacherTargets(topk=(tv, ti)), labels,
                 loss=L.LogitLoss(kind=kind, temperature=1.5, ce_weight=0.2),
                 numerics=L.LossNumerics(chunk_size=chunk_size),
                 ref_kwargs=dict(topk=(tv, ti), tau=1.5, ce_weight=0.2))


def test_chunked_without_labels_and_ce_only():
    h, w, th, tw, _ = _setup(4)
    h_ = h.clone().requires_grad_(True)
    out = L.chunked_distill_loss(h_, w, L.TeacherTargets(th, tw),
                                 numerics=L.LossNumerics(chunk_size=4))  # frozen lm_head: only grad_h
    h64 = h.double().requires_grad_(True)
    ref = ref_forward_kl(h64 @ w.double().t(), (th @ tw.t()).double())
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)
    out.backward()
    ref.backward()
    torch.testing.assert_close(h_.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    _, _, _, _, labels = _setup(4)
    _compare(h, w, L.TeacherTargets(th, tw), labels, loss=L.LogitLoss(kl_weight=0.0, ce_weight=1.0),
             numerics=L.LossNumerics(chunk_size=5), ref_kwargs=dict(kl_weight=0.0, ce_weight=1.0))
    # CE-only needs no teacher at all
    out = L.chunked_distill_loss(h, w, labels=labels, loss=L.LogitLoss(kl_weight=0.0, ce_weight=1.0),
                                 numerics=L.LossNumerics(chunk_size=2))
    assert out.item() == pytest.approx(ref_ce((h @ w.t()).double(), labels).item(), rel=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 4, None])
@pytest.mark.parametrize("kl_weight,ce_weight,tau", [(1.0, 0.0, 1.0), (1.0, 0.0, 2.5), (0.7, 0.4, 1.0),
                                                     (0.0, 1.0, 1.0)])
def test_closed_form_path_matches_naive(kl_weight, ce_weight, tau, chunk_size):
    """Forward KL and/or CE without softcap take the in-place closed-form gradient."""
    h, w, th, tw, labels = _setup(11)
    cfg = L._ChunkConfig(kind="forward_kl", kl_weight=kl_weight, ce_weight=ce_weight, temperature=tau,
                         beta=0.5, chunk_size=chunk_size, student_softcap=None, teacher_softcap=None,
                         ignore_index=-100, matmul_dtype=torch.float32, need_grad_h=True, need_grad_w=True)
    assert L._use_fast_path(cfg, has_teacher_logits=kl_weight != 0.0)
    _compare(h, w, L.TeacherTargets(th, tw), labels,
             loss=L.LogitLoss(kl_weight=kl_weight, ce_weight=ce_weight, temperature=tau),
             numerics=L.LossNumerics(chunk_size=chunk_size),
             ref_kwargs=dict(kl_weight=kl_weight, ce_weight=ce_weight, tau=tau))
    # without gradients (evaluation) the loss is the same
    with torch.no_grad():
        out = L.chunked_distill_loss(h, w, L.TeacherTargets(th, tw), labels=labels,
                                     loss=L.LogitLoss(kl_weight=kl_weight, ce_weight=ce_weight, temperature=tau),
                                     numerics=L.LossNumerics(chunk_size=chunk_size))
    ref = _ref_total(h.double(), w.double(), th.double(), tw.double(), labels, kl_weight=kl_weight,
                     ce_weight=ce_weight, tau=tau)
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)


def test_fast_path_is_skipped_where_it_does_not_apply():
    base = dict(kind="forward_kl", kl_weight=1.0, ce_weight=0.0, temperature=1.0, beta=0.5, chunk_size=4,
                student_softcap=None, teacher_softcap=None, ignore_index=-100, matmul_dtype=torch.float32,
                need_grad_h=True, need_grad_w=True)
    assert L._use_fast_path(L._ChunkConfig(**base), True)
    assert not L._use_fast_path(L._ChunkConfig(**{**base, "student_softcap": 30.0}), True)
    assert not L._use_fast_path(L._ChunkConfig(**{**base, "kind": "jsd"}), True)
    assert L._use_fast_path(L._ChunkConfig(**{**base, "kind": "topk_kl"}), False)  # sparse closed form
    assert L._use_fast_path(L._ChunkConfig(**{**base, "kind": "sampled_kl"}), False)
    assert not L._use_fast_path(L._ChunkConfig(**{**base, "kind": "topk_kl", "student_softcap": 30.0}), False)
    assert not L._use_fast_path(L._ChunkConfig(**{**base, "kind": "reverse_kl"}), True)
    assert not L._use_fast_path(L._ChunkConfig(**{**base, "ce_weight": 0.5, "temperature": 2.0}), True)


def test_auto_chunk_size_bounds_the_chunk_buffer():
    assert L.auto_chunk_size(49_152) == 1024  # SmolLM2
    assert L.auto_chunk_size(262_144) == 256  # Gemma-3: 256 x 262,144 x 4 B = 256 MiB
    assert L.auto_chunk_size(151_936) == 256  # Qwen
    assert L.auto_chunk_size(10_000_000) == 128  # floor
    for vocab in (1000, 49_152, 128_256, 262_144):
        c = L.auto_chunk_size(vocab)
        assert c & (c - 1) == 0 and (c == 128 or c * vocab * 4 <= L.CHUNK_BYTES)
    # chunk_size=0 picks it automatically and matches one chunk
    h, w, th, tw, labels = _setup(12)
    auto = L.chunked_distill_loss(h, w, L.TeacherTargets(th, tw), labels=labels, numerics=L.LossNumerics(chunk_size=0))
    one = L.chunked_distill_loss(h, w, L.TeacherTargets(th, tw), labels=labels,
                                 numerics=L.LossNumerics(chunk_size=None))
    assert auto.item() == pytest.approx(one.item(), rel=1e-6)
    with pytest.raises(ValueError, match="chunk_size"):
        L.chunked_distill_loss(h, w, L.TeacherTargets(th, tw), labels=labels, numerics=L.LossNumerics(chunk_size=-1))


def test_chunk_weighting_is_by_token_count():
    """Uneven chunks (valid counts 3,3,2) must give the global mean, not a mean of means."""
    h, w, th, tw, labels = _setup(5)
    out3 = L.chunked_distill_loss(h, w, L.TeacherTargets(th, tw), labels=labels, numerics=L.LossNumerics(chunk_size=3))
    out_all = L.chunked_distill_loss(h, w, L.TeacherTargets(th, tw), labels=labels,
                                     numerics=L.LossNumerics(chunk_size=None))
    mask = labels != -100
    direct = L.forward_kl(h @ w.t(), th @ tw.t(), mask=mask)
    assert out3.item() == pytest.approx(direct.item(), rel=1e-5)
    assert out_all.item() == pytest.approx(direct.item(), rel=1e-5)


def test_chunked_tied_weights():
    g = torch.Generator().manual_seed(6)
    emb64 = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    a64 = torch.randn(H, H, generator=g, dtype=torch.float64) * 0.3
    ids = torch.randint(0, V, (N,), generator=g)
    th, tw, labels = torch.randn(N, HT, generator=g), torch.randn(V, HT, generator=g) * 0.5, ids.roll(-1)
    labels[-1] = -100

    def run(dtype, ours):
        emb = emb64.clone().to(dtype).requires_grad_(True)
        a = a64.clone().to(dtype).requires_grad_(True)
        hidden = torch.tanh(emb[ids] @ a)  # the same tensor is embedding and lm_head
        if ours:
            loss = L.chunked_distill_loss(hidden, emb, L.TeacherTargets(th, tw), labels=labels,
                                          loss=L.LogitLoss(ce_weight=0.5), numerics=L.LossNumerics(chunk_size=4))
        else:
            loss = _ref_total(hidden, emb, th.double(), tw.double(), labels, ce_weight=0.5)
        loss.backward()
        return loss, emb.grad, a.grad

    l1, ge1, ga1 = run(torch.float32, True)
    l2, ge2, ga2 = run(torch.float64, False)
    assert l1.item() == pytest.approx(l2.item(), rel=1e-5)
    torch.testing.assert_close(ge1.double(), ge2, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ga1.double(), ga2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fp32_matmul", [True, False])
def test_chunked_bf16_inputs(fp32_matmul):
    h, w, th, tw, labels = _setup(7, dtype=torch.bfloat16)
    # reference runs in float64 on the exact bf16 values; bf16 grads are rounded
    tol = dict(rtol=1e-5, atol=1e-6) if fp32_matmul else dict(rtol=3e-2, atol=3e-2)
    matmul_dtype = torch.float32 if fp32_matmul else None  # None: the weight's dtype
    _compare(h, w, L.TeacherTargets(th, tw), labels, loss=L.LogitLoss(ce_weight=0.3),
             numerics=L.LossNumerics(chunk_size=3, matmul_dtype=matmul_dtype), grad_rtol=3e-2, grad_atol=2e-3,
             ref_kwargs=dict(ce_weight=0.3), **tol)


def test_chunked_fp32_matmul_false_float32_inputs():
    h, w, th, tw, labels = _setup(8)
    _compare(h, w, L.TeacherTargets(th, tw), labels, loss=L.LogitLoss(kind="jsd"),
             numerics=L.LossNumerics(chunk_size=4, matmul_dtype=None), ref_kwargs=dict(kind="jsd"))


def test_chunked_under_autocast():
    h, w, th, tw, labels = _setup(9)
    kwargs = dict(labels=labels, numerics=L.LossNumerics(chunk_size=3),
                  loss=L.LogitLoss(ce_weight=0.5, kind="reverse_kl"))
    h1, w1 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    plain = L.chunked_distill_loss(h1, w1, L.TeacherTargets(th, tw), **kwargs)
    plain.backward()
    h2, w2 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = L.chunked_distill_loss(h2, w2, L.TeacherTargets(th, tw), **kwargs)
    auto.backward()
    assert auto.dtype == torch.float32
    assert auto.item() == pytest.approx(plain.item(), rel=1e-6)
    torch.testing.assert_close(h2.grad, h1.grad)
    torch.testing.assert_close(w2.grad, w1.grad)
    # bf16 hidden states produced by an autocast matmul, fp32 weight
    h3 = h.clone().requires_grad_(True)
    w3 = w.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = h3 @ torch.eye(H)
        assert hidden.dtype == torch.bfloat16
        loss = L.chunked_distill_loss(hidden, w3, L.TeacherTargets(th, tw), **kwargs)
    loss.backward()
    assert h3.grad.dtype == torch.float32 and w3.grad.dtype == torch.float32
    torch.testing.assert_close(w3.grad, w1.grad, rtol=3e-2, atol=3e-3)


def test_chunked_grad_output_scaling_and_components():
    h, w, th, tw, labels = _setup(10)
    h1 = h.clone().requires_grad_(True)
    loss, comps = L.chunked_distill_loss(h1, w, L.TeacherTargets(th, tw), labels=labels,
                                         loss=L.LogitLoss(ce_weight=0.5), numerics=L.LossNumerics(chunk_size=4),
                                         return_components=True)
    (3.0 * loss).backward()
    h2 = h.clone().requires_grad_(True)
    L.chunked_distill_loss(h2, w, L.TeacherTargets(th, tw), labels=labels, loss=L.LogitLoss(ce_weight=0.5),
                           numerics=L.LossNumerics(chunk_size=4)).backward()
    torch.testing.assert_close(h1.grad, 3.0 * h2.grad)
    mask = labels != -100
    kl = L.forward_kl(h @ w.t(), th @ tw.t(), mask=mask)
    assert comps["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert comps["ce"].item() == pytest.approx(L.cross_entropy(h @ w.t(), labels).item(), rel=1e-5)
    assert loss.item() == pytest.approx(comps["kl"].item() + 0.5 * comps["ce"].item(), rel=1e-6)
    assert not comps["kl"].requires_grad


def test_chunked_no_grad_and_all_ignored():
    h, w, th, tw, labels = _setup(11)
    with torch.no_grad():
        out = L.chunked_distill_loss(h.requires_grad_(True), w, L.TeacherTargets(th, tw), labels=labels,
                                     numerics=L.LossNumerics(chunk_size=5))
    assert not out.requires_grad
    assert out.item() == pytest.approx(
        L.forward_kl(h @ w.t(), th @ tw.t(), mask=labels != -100).item(), rel=1e-5)
    h_ = h.detach().clone().requires_grad_(True)
    w_ = w.clone().requires_grad_(True)
    out = L.chunked_distill_loss(h_, w_, L.TeacherTargets(th, tw), labels=torch.full((N,), -100),
                                 loss=L.LogitLoss(ce_weight=1.0))
    out.backward()
    assert out.item() == 0.0
    assert torch.all(h_.grad == 0) and torch.all(w_.grad == 0)


def test_chunked_argument_errors():
    h, w, th, tw, labels = _setup(12)
    tv, ti = (th @ tw.t()).topk(5, dim=-1)
    with pytest.raises(ValueError):
        L.chunked_distill_loss(h, w, L.TeacherTargets(th, tw), loss=L.LogitLoss(kind="topk_kl"))
    with pytest.raises(ValueError):
        L.chunked_distill_loss(h, w, L.TeacherTargets(topk=(tv, ti)), loss=L.LogitLoss(kind="reverse_kl"))
    with pytest.raises(ValueError):
        L.chunked_distill_loss(h, w, L.TeacherTargets(th, tw), loss=L.LogitLoss(kind="nope"))
    with pytest.raises(ValueError):
        L.chunked_distill_loss(h, w, L.TeacherTargets(th, tw), loss=L.LogitLoss(ce_weight=1.0))  # no labels
    with pytest.raises(ValueError):
        L.chunked_distill_loss(h, w, L.TeacherTargets(th, tw[:-1]))  # vocab mismatch
    # the teacher's side is exactly one of live, top-k or samples
    with pytest.raises(ValueError, match="exactly one"):
        L.TeacherTargets(th, tw, topk=(tv, ti))
    with pytest.raises(ValueError, match="exactly one"):
        L.TeacherTargets()
    with pytest.raises(ValueError, match="both hidden and weight"):
        L.TeacherTargets(hidden=th)
    with pytest.raises(ValueError, match="softcap"):
        L.TeacherTargets(topk=(tv, ti), softcap=30.0)
    assert L.TeacherTargets.from_cache(tv, ti, "topk_kl").topk[0] is tv
    assert L.TeacherTargets.from_cache(tv, ti, "sampled_kl").samples[1] is ti


class _MaxNumel(TorchDispatchMode):
    """Records the largest numel of any tensor produced by an op."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_chunked_never_materialises_full_logits():
    n, v, hs, ht = 2048, 8192, 32, 48
    g = torch.Generator().manual_seed(13)
    h = torch.randn(n, hs, generator=g, requires_grad=True)
    w = (torch.randn(v, hs, generator=g) * 0.2).requires_grad_(True)
    th, tw = torch.randn(n, ht, generator=g), torch.randn(v, ht, generator=g) * 0.2
    labels = torch.randint(0, v, (n,), generator=g)
    mode = _MaxNumel()
    with mode:
        loss = L.chunked_distill_loss(h, w, L.TeacherTargets(th, tw), labels=labels, loss=L.LogitLoss(ce_weight=0.5),
                                      numerics=L.LossNumerics(chunk_size=256))
        loss.backward()
    assert torch.isfinite(loss) and h.grad is not None and w.grad is not None
    assert mode.max_numel <= 256 * v < n * v // 4
    # the instrument does see a full [n, V] tensor when chunking is off
    m = 512
    control = _MaxNumel()
    with control, torch.no_grad():
        L.chunked_distill_loss(h[:m], w, L.TeacherTargets(th[:m], tw), labels=labels[:m],
                               numerics=L.LossNumerics(chunk_size=None))
    assert control.max_numel >= m * v


# --------------------------------------------------------------------------
# intermediate-state loss
# --------------------------------------------------------------------------
def _states(n_layers, b, t, hdim, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, t, hdim, generator=g) for _ in range(n_layers)]


def ref_is_loss(student, teacher, layer_map, weight=None, mask=None):
    total = 0.0
    for si, ti in layer_map:
        s, t = student[si].double(), teacher[ti].double()
        if weight is not None:
            s = s @ weight.double().t()
        vals = []
        for b in range(s.shape[0]):
            for j in range(s.shape[1]):
                if mask is not None and not bool(mask[b, j]):
                    continue
                x, y = s[b, j], t[b, j]
                vals.append(1 - (x @ y) / (torch.sqrt(x @ x) * torch.sqrt(y @ y)))
        total = total + torch.stack(vals).mean()
    return total / len(layer_map)


def test_is_loss_equal_widths():
    states = _states(4, 2, 5, 12, 0)
    lm = [(0, 1), (2, 3)]
    mod = L.IntermediateStateLoss(12, 12, lm)
    assert list(mod.parameters()) == []
    assert abs(L.IntermediateStateLoss(12, 12, [(0, 0), (3, 3)])(states, states).item()) < 1e-6
    assert mod(states, states).item() > 0.1  # pairs (0, 1), (2, 3) compare different layers
    teacher = _states(4, 2, 5, 12, 1)
    mask = torch.rand(2, 5, generator=torch.Generator().manual_seed(0)) > 0.4
    mask[0, 0] = True
    out = mod(states, teacher, mask)
    ref = ref_is_loss(states, teacher, lm, mask=mask)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)
    # gradient reaches the student states, not the teacher states
    s_req = [x.clone().requires_grad_(True) for x in states]
    t_req = [x.clone().requires_grad_(True) for x in teacher]
    mod(s_req, t_req).backward()
    assert s_req[0].grad is not None and s_req[0].grad.abs().sum() > 0
    assert s_req[1].grad is None and t_req[1].grad is None


def test_is_loss_different_widths_projection():
    hs, ht = 8, 12
    student = _states(3, 2, 4, hs, 2)
    teacher = _states(6, 2, 4, ht, 3)
    lm = L.default_layer_map(3, 6)
    mod = L.IntermediateStateLoss(hs, ht, lm)
    params = list(mod.parameters())
    assert len(params) == 1 and params[0].shape == (ht, hs) and params[0].requires_grad
    # truncated-identity init
    torch.testing.assert_close(params[0].detach(), torch.eye(ht, hs))
    out = mod(student, teacher)
    ref = ref_is_loss(student, teacher, lm, weight=params[0].detach())
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)
    out.backward()
    assert params[0].grad is not None and params[0].grad.abs().sum() > 0
    # identical information => zero loss: teacher state = channel-selected student
    kept = [1, 3, 4, 6, 7, 8, 10, 11]
    mod2 = L.IntermediateStateLoss(hs, ht, [(0, 0)], channel_map=kept)
    t_state = torch.zeros(2, 4, ht)
    t_state[..., kept] = student[0]
    assert abs(mod2([student[0]], [t_state]).item()) < 1e-6
    # bf16 states are accepted, result is float32
    out_bf = mod([x.bfloat16() for x in student], [x.bfloat16() for x in teacher])
    assert out_bf.dtype == torch.float32
    assert out_bf.item() == pytest.approx(out.item(), abs=2e-2)


def test_default_layer_map():
    assert L.default_layer_map(4, 8) == [(0, 1), (1, 3), (2, 5), (3, 7)]
    assert L.default_layer_map(5, 5) == [(i, i) for i in range(5)]
    assert L.default_layer_map(3, 32)[-1] == (2, 31)
    assert L.default_layer_map(2, 4, offset=1) == [(1, 2), (2, 4)]
    m = L.default_layer_map(6, 4)
    assert [t for _, t in m] == sorted(t for _, t in m) and m[-1] == (5, 3) and m[0][1] >= 0


def test_dynamic_weight():
    a = torch.tensor(2.0, requires_grad=True)
    b = torch.tensor(0.5, requires_grad=True)
    l_logits, l_is = a * 1.5, b * 1.0
    total = L.dynamic_weight(l_logits, l_is)
    # value: l_logits + l_logits = 2 * l_logits; IS part equals l_logits
    assert total.item() == pytest.approx(2 * l_logits.item())
    assert (total - l_logits).item() == pytest.approx(l_logits.item())
    total.backward()
    assert a.grad.item() == pytest.approx(1.5)  # coefficient is detached
    assert b.grad.item() == pytest.approx(3.0 / 0.5)  # alpha = l_logits / l_is
    z = L.dynamic_weight(torch.tensor(1.0), torch.tensor(0.0))
    assert torch.isfinite(z) and z.item() == 1.0


@pytest.mark.parametrize("chunk_size", [1, 4, None])
@pytest.mark.parametrize("ce_weight,tau", [(0.0, 1.0), (0.0, 2.0), (0.3, 1.0)])
def test_topk_closed_form_matches_naive(ce_weight, tau, chunk_size):
    """Cached top-k targets take the sparse closed-form gradient; it equals autograd on the naive loss."""
    h, w, th, tw, labels = _setup(5)
    tv, ti = (th @ tw.t()).topk(10, dim=-1)
    _compare(h, w, L.TeacherTargets(topk=(tv, ti)), labels,
             loss=L.LogitLoss(kind="topk_kl", temperature=tau, ce_weight=ce_weight),
             numerics=L.LossNumerics(chunk_size=chunk_size),
             ref_kwargs=dict(topk=(tv, ti), tau=tau, ce_weight=ce_weight))


def _ref_sampled(h, w, logp, idx, labels, ce_weight=0.0):
    """Naive sampled KL in float64: per valid token, mean_j (log p_t(x_j) - log q(x_j))."""
    s = torch.log_softmax(h @ w.t(), dim=-1)
    valid = labels != -100
    per_tok = (logp.double() - s.gather(-1, idx)).mean(dim=-1)
    loss = per_tok[valid].mean()
    if ce_weight:
        loss = loss + ce_weight * (-s[valid].gather(-1, labels[valid].unsqueeze(1))).mean()
    return loss


@pytest.mark.parametrize("chunk_size", [1, 5, None])
@pytest.mark.parametrize("ce_weight", [0.0, 0.4])
def test_sampled_kl_matches_naive(ce_weight, chunk_size):
    h, w, th, tw, labels = _setup(6)
    t_logp = torch.log_softmax(th @ tw.t(), dim=-1)
    g = torch.Generator().manual_seed(1)
    idx = torch.multinomial(t_logp.exp(), 12, replacement=True, generator=g)  # [N, 12], repeats allowed
    logp = t_logp.gather(-1, idx)
    h_, w_ = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = L.chunked_distill_loss(h_, w_, L.TeacherTargets(samples=(logp, idx)), labels=labels,
                                 loss=L.LogitLoss(kind="sampled_kl", ce_weight=ce_weight),
                                 numerics=L.LossNumerics(chunk_size=chunk_size))
    out.backward()
    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = _ref_sampled(h64, w64, logp, idx, labels, ce_weight)
    ref.backward()
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(h_.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w_.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
    # forward_kl + teacher_samples means sampled_kl
    same = L.chunked_distill_loss(h, w, L.TeacherTargets(samples=(logp, idx)), labels=labels,
                                  loss=L.LogitLoss(ce_weight=ce_weight), numerics=L.LossNumerics(chunk_size=chunk_size))
    assert same.item() == pytest.approx(out.item(), rel=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        L.chunked_distill_loss(h, w, L.TeacherTargets(samples=(logp, idx)), labels=labels,
                               loss=L.LogitLoss(temperature=2.0))


def test_sampled_kl_is_unbiased_for_the_full_kl_and_its_gradient():
    """With many draws, the sampled loss and gradient converge to the full forward KL's."""
    h, w, th, tw, labels = _setup(7)
    t_logp = torch.log_softmax(th @ tw.t(), dim=-1)
    idx = torch.multinomial(t_logp.exp(), 20_000, replacement=True, generator=torch.Generator().manual_seed(2))
    h_s = h.clone().requires_grad_(True)
    sampled = L.chunked_distill_loss(h_s, w, L.TeacherTargets(samples=(t_logp.gather(-1, idx), idx)), labels=labels)
    sampled.backward()
    h_f = h.clone().requires_grad_(True)
    full = L.chunked_distill_loss(h_f, w, L.TeacherTargets(th, tw), labels=labels)
    full.backward()
    assert sampled.item() == pytest.approx(full.item(), rel=0.02)
    torch.testing.assert_close(h_s.grad, h_f.grad, rtol=0.0, atol=0.02 * h_f.grad.abs().max().item())
    # a biased target (top-k renormalised) does not converge: its gradient stays off
    tv, ti = (th @ tw.t()).topk(3, dim=-1)
    h_k = h.clone().requires_grad_(True)
    L.chunked_distill_loss(h_k, w, L.TeacherTargets(topk=(tv, ti)), labels=labels).backward()
    assert (h_k.grad - h_f.grad).abs().max() > 3 * (h_s.grad - h_f.grad).abs().max()


def test_closed_form_ce_only_uses_the_raw_logits_whatever_the_temperature():
    h, w, th, tw, labels = _setup(8)
    out = L.chunked_distill_loss(h, w, labels=labels, loss=L.LogitLoss(kl_weight=0.0, ce_weight=1.0, temperature=2.5),
                                 numerics=L.LossNumerics(chunk_size=3))
    assert out.item() == pytest.approx(ref_ce((h @ w.t()).double(), labels).item(), rel=1e-5)


def test_bf16_vocab_matmuls_stay_close_to_the_float64_reference():
    """matmul_dtype=bfloat16 (recovery under bf16 autocast): logits and both gradient GEMMs in
    bf16, softmax and accumulation in float32: within bf16 rounding of the exact values."""
    h, w, th, tw, labels = _setup(9)
    _compare(h, w, L.TeacherTargets(th, tw), labels, numerics=L.LossNumerics(chunk_size=4, matmul_dtype=torch.bfloat16),
             rtol=2e-2, atol=2e-3, grad_rtol=5e-2, grad_atol=5e-3 * max(1.0, float(w.abs().max())))


def test_reused_buffers_do_not_leak_between_calls():
    """The closed form reuses cached [c, V] buffers: interleaved calls give the fresh results."""
    a, b = _setup(10), _setup(11)

    def run(setup):
        h, w, th, tw, labels = setup
        h_, w_ = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = L.chunked_distill_loss(h_, w_, L.TeacherTargets(th, tw), labels=labels,
                                      numerics=L.LossNumerics(chunk_size=4))
        loss.backward()
        return loss.detach(), h_.grad, w_.grad

    first = run(a)
    run(b)
    L.release_workspace()
    run(b)
    again = run(a)
    for x, y in zip(first, again):
        assert torch.equal(x, y)


# --------------------------------------------------------------------------
# the step's normalizer inside the loss; the compiled chunk kernel
# --------------------------------------------------------------------------
def test_normalizer_divides_the_sums_by_the_steps_targets():
    """normalizer=n: the loss, its components and both gradients are the mean's times valid / n."""
    h, w, th, tw, labels = _setup(13)
    valid = int((labels != -100).sum())
    runs = []
    for normalizer in (None, 50):
        h_, w_ = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss, parts = L.chunked_distill_loss(h_, w_, L.TeacherTargets(th, tw), labels=labels,
                                             loss=L.LogitLoss(kl_weight=0.6, ce_weight=0.3),
                                             numerics=L.LossNumerics(chunk_size=4), normalizer=normalizer,
                                             return_components=True)
        loss.backward()
        runs.append((loss.detach(), parts["kl"], parts["ce"], h_.grad, w_.grad))
    for mean, share in zip(*runs):
        torch.testing.assert_close(share, mean * valid / 50, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="normalizer"):
        L.chunked_distill_loss(h, w, L.TeacherTargets(th, tw), labels=labels, normalizer=0)


needs_compiler = pytest.mark.skipif(cpp_compiler() is None, reason="inductor's CPU backend needs a C++ compiler")


@needs_compiler
@pytest.mark.parametrize("kl_weight,ce_weight,tau", [(0.7, 0.4, 1.0), (1.0, 0.0, 2.5)])
def test_compiled_chunk_matches_naive(kl_weight, ce_weight, tau):
    """compiled=True computes forward KL and/or CE in one compiled kernel per chunk: the float64
    reference with and without gradients, chunks of 4 and a remainder of 1 (9 valid tokens).
    Two variants (each compiles for seconds): KL + CE (both gradient terms) and a tempered KL."""
    h, w, th, tw, labels = _setup(12)
    _compare(h, w, L.TeacherTargets(th, tw), labels,
             loss=L.LogitLoss(kl_weight=kl_weight, ce_weight=ce_weight, temperature=tau),
             numerics=L.LossNumerics(chunk_size=4, compiled=True),
             ref_kwargs=dict(kl_weight=kl_weight, ce_weight=ce_weight, tau=tau))
    with torch.no_grad():
        out = L.chunked_distill_loss(h, w, L.TeacherTargets(th, tw), labels=labels,
                                     loss=L.LogitLoss(kl_weight=kl_weight, ce_weight=ce_weight, temperature=tau),
                                     numerics=L.LossNumerics(chunk_size=4, compiled=True))
    ref = _ref_total(h.double(), w.double(), th.double(), tw.double(), labels, kl_weight=kl_weight,
                     ce_weight=ce_weight, tau=tau)
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)


@needs_compiler
def test_compiled_chunk_in_bf16_matches_the_eager_bf16_path():
    """Under bf16 matmuls the compiled kernel reads the same bf16 logits as the eager path and
    writes its gradient in bf16: equal to the eager path within bf16 rounding of the gradient,
    and both within bf16 rounding of the float64 reference."""
    h, w, th, tw, labels = _setup(14)
    outs = []
    for compiled in (False, True):
        h_, w_ = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = L.chunked_distill_loss(h_, w_, L.TeacherTargets(th, tw), labels=labels,
                                      numerics=L.LossNumerics(chunk_size=4, matmul_dtype=torch.bfloat16,
                                                              compiled=compiled))
        loss.backward()
        outs.append((loss.detach(), h_.grad, w_.grad))
    (l0, gh0, gw0), (l1, gh1, gw1) = outs
    assert l1.item() == pytest.approx(l0.item(), rel=1e-5)
    torch.testing.assert_close(gh1, gh0, rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(gw1, gw0, rtol=2e-2, atol=1e-4)
    _compare(h, w, L.TeacherTargets(th, tw), labels,
             numerics=L.LossNumerics(chunk_size=4, matmul_dtype=torch.bfloat16, compiled=True), rtol=2e-2,
             atol=2e-3, grad_rtol=5e-2, grad_atol=5e-3 * max(1.0, float(w.abs().max())))


@needs_compiler
def test_compiled_flag_leaves_other_losses_on_the_eager_path():
    """Soft-capping, reverse KL and cached targets are not in the kernel: compiled=True gives
    exactly the eager result for them."""
    h, w, th, tw, labels = _setup(15)
    tv, ti = (th @ tw.t()).topk(10, dim=-1)
    live = L.TeacherTargets(th, tw)
    for teacher, kwargs in ((live, dict(loss=L.LogitLoss(kind="reverse_kl"))),
                            (L.TeacherTargets(th, tw, softcap=6.0), dict(student_softcap=4.0)),
                            (L.TeacherTargets(topk=(tv, ti)), {})):
        a = L.chunked_distill_loss(h, w, teacher, labels=labels, numerics=L.LossNumerics(chunk_size=4), **kwargs)
        b = L.chunked_distill_loss(h, w, teacher, labels=labels, numerics=L.LossNumerics(chunk_size=4, compiled=True),
                                   **kwargs)
        assert torch.equal(a, b)


# --------------------------------------------------------------------------
# a mixture of teachers (TeacherTargets.mixture)
# --------------------------------------------------------------------------
def _members(seed, hidden_sizes=(24, 8, 16)):
    """Live teachers of different widths: ``[(hidden [N, H_i], weight [V, H_i])]``."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(N, hs, generator=g), torch.randn(V, hs, generator=g) * 0.5) for hs in hidden_sizes]


def _token_weights(seed, t):
    """``[N, t]`` per-token weights: random rows, one-hot rows (a source with its own teacher) and a zero entry."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(N, t, generator=g) + 0.1
    w[1] = 0.0
    w[1, 0] = 3.0
    w[2] = 0.0
    w[2, t - 1] = 1.0
    w[3, 1] = 0.0
    return w


def ref_mixture_probs(members, weights, tau):
    """Naive float64 ``[N, V]`` ``p_mix = sum_j w_j softmax(t_j / tau)``; a member is ``("live", logits)``
    or ``("topk", values, indices)`` (its softmax over the top-k, 0 elsewhere)."""
    w = weights.double()
    w = w.expand(N, -1) if w.dim() == 1 else w
    w = w / w.sum(-1, keepdim=True)
    rows = []
    for i in range(N):
        p = torch.zeros(V, dtype=torch.float64)
        for j, member in enumerate(members):
            part = torch.zeros(V, dtype=torch.float64)
            if member[0] == "live":
                part = _softmax(member[1][i].double() / tau)
            else:
                part[member[2][i]] = _softmax(member[1][i].double() / tau)
            p = p + w[i, j] * part
        rows.append(p)
    return torch.stack(rows)


def ref_mixture_loss(z, p_mix, labels, *, kind="forward_kl", tau=1.0, beta=0.5, ce_weight=0.0):
    """Naive float64 divergence of the student logits ``z`` ``[N, V]`` from ``p_mix``, KL by hand."""
    vals = []
    for i in _rows(N, labels != -100):
        p, q = p_mix[i], _softmax(z[i] / tau)
        pos = p > 0
        fwd = (p[pos] * torch.log(p[pos] / q[pos])).sum()
        rev = (q * (torch.log(q) - torch.log(p.clamp_min(1e-300)))).sum()
        m = beta * p + (1 - beta) * q
        jsd = beta * (p[pos] * torch.log(p[pos] / m[pos])).sum() + (1 - beta) * (q * torch.log(q / m)).sum()
        vals.append({"forward_kl": fwd, "reverse_kl": rev, "jsd": jsd}[kind])
    total = torch.stack(vals).mean() * tau**2
    return total + ce_weight * ref_ce(z, labels) if ce_weight else total


def _compare_mixture(target, ref_members, weights, *, kind="forward_kl", tau=1.0, ce_weight=0.0, chunk_size=4,
                     student_softcap=None, seed=21):
    h, w, _, _, labels = _setup(seed)
    h_, w_ = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = L.chunked_distill_loss(h_, w_, target, labels=labels,
                                 loss=L.LogitLoss(kind=kind, temperature=tau, beta=0.3, ce_weight=ce_weight),
                                 numerics=L.LossNumerics(chunk_size=chunk_size), student_softcap=student_softcap)
    out.backward()
    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = ref_mixture_loss(ref_softcap(h64 @ w64.t(), student_softcap), ref_mixture_probs(ref_members, weights, tau),
                           labels, kind=kind, tau=tau, beta=0.3, ce_weight=ce_weight)
    ref.backward()
    assert torch.isfinite(out) and out.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(h_.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w_.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
    return out


@pytest.mark.parametrize("chunk_size", [1, 4, None])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("kind,tau,softcapped", [("forward_kl", 1.0, False), ("forward_kl", 2.0, False),
                                                 ("forward_kl", 1.5, True), ("reverse_kl", 2.0, False),
                                                 ("jsd", 1.5, False)])
def test_mixture_of_teachers_matches_naive(kind, tau, softcapped, per_token, chunk_size):
    """Three live teachers of different widths, global or per-token weights: the loss and both gradients
    equal autograd through the dense float64 mixture (forward KL in the closed form, the other kinds and a
    soft-capped student on the autograd path)."""
    members = _members(22)
    weights = _token_weights(23, 3) if per_token else torch.tensor([0.5, 0.2, 0.3])
    caps = (None, 5.0, None)  # one member soft-capped
    target = L.TeacherTargets.mixture([L.TeacherTargets(th, tw, softcap=c) for (th, tw), c in zip(members, caps)],
                                      weights)
    ref = [("live", ref_softcap(th.double() @ tw.double().t(), c)) for (th, tw), c in zip(members, caps)]
    _compare_mixture(target, ref, weights, kind=kind, tau=tau, chunk_size=chunk_size,
                     student_softcap=4.0 if softcapped else None)


@pytest.mark.parametrize("chunk_size", [3, None])
@pytest.mark.parametrize("ce_weight,tau", [(0.0, 1.5), (0.4, 1.0), (0.4, 2.0)])
def test_mixture_of_a_live_and_a_top_k_teacher_matches_naive(ce_weight, tau, chunk_size):
    """A cached top-k member has probability 0 outside its top-k; with CE and any temperature."""
    (th, tw), (th2, tw2) = _members(24, (24, 12))
    tv, ti = (th2 @ tw2.t()).topk(7, dim=-1)
    weights = torch.tensor([0.6, 0.4])
    target = L.TeacherTargets.mixture([L.TeacherTargets(th, tw), L.TeacherTargets(topk=(tv, ti))], weights)
    _compare_mixture(target, [("live", th.double() @ tw.double().t()), ("topk", tv, ti)], weights, tau=tau,
                     ce_weight=ce_weight, chunk_size=chunk_size)


def test_mixture_of_top_k_teachers_only_stays_finite():
    """Every member sparse: tokens outside all top-k have log-probability floored, probability 0, no NaN."""
    (th, tw), (th2, tw2) = _members(25, (24, 12))
    a, b = (th @ tw.t()).topk(5, dim=-1), (th2 @ tw2.t()).topk(3, dim=-1)
    weights = _token_weights(26, 2)
    target = L.TeacherTargets.mixture([L.TeacherTargets(topk=a), L.TeacherTargets(topk=b)], weights)
    _compare_mixture(target, [("topk", *a), ("topk", *b)], weights, tau=1.3)


def _loss_and_grads(target, *, kind="forward_kl", tau=1.0, seed=27, chunk_size=4):
    h, w, _, _, labels = _setup(seed)
    h_, w_ = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = L.chunked_distill_loss(h_, w_, target, labels=labels, loss=L.LogitLoss(kind=kind, temperature=tau),
                                 numerics=L.LossNumerics(chunk_size=chunk_size))
    out.backward()
    return out.detach(), h_.grad, w_.grad


@pytest.mark.parametrize("kind,tau", [("forward_kl", 1.0), ("forward_kl", 2.0), ("reverse_kl", 1.5), ("jsd", 1.0)])
def test_one_teacher_of_weight_1_and_two_identical_teachers_equal_one_teacher(kind, tau):
    (th, tw), = _members(28, (24,))
    one = _loss_and_grads(L.TeacherTargets(th, tw), kind=kind, tau=tau)
    alone = _loss_and_grads(L.TeacherTargets.mixture([L.TeacherTargets(th, tw)], torch.tensor([1.0])), kind=kind,
                            tau=tau)
    twice = _loss_and_grads(L.TeacherTargets.mixture([L.TeacherTargets(th, tw)] * 2, torch.tensor([0.7, 0.3])),
                            kind=kind, tau=tau)
    for got in (alone, twice):
        assert got[0].item() == pytest.approx(one[0].item(), rel=1e-6, abs=1e-7)
        torch.testing.assert_close(got[1], one[1], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[2], one[2], rtol=1e-5, atol=1e-7)
    # a top-k teacher alone in a mixture is today's topk_kl
    tv, ti = (th @ tw.t()).topk(9, dim=-1)
    if kind == "forward_kl":
        topk = _loss_and_grads(L.TeacherTargets(topk=(tv, ti)), tau=tau)
        mixed = _loss_and_grads(L.TeacherTargets.mixture([L.TeacherTargets(topk=(tv, ti))] * 2), tau=tau)
        assert mixed[0].item() == pytest.approx(topk[0].item(), rel=1e-6)
        torch.testing.assert_close(mixed[1], topk[1], rtol=1e-5, atol=1e-7)


def test_mixture_in_bf16_and_with_the_compiled_flag():
    """bf16 vocab matmuls stay within bf16 rounding of the float32 mixture; ``compiled=True`` leaves a
    mixture on the eager closed form (the same numbers, no compiler needed)."""
    members = _members(29, (24, 16))
    target = L.TeacherTargets.mixture([L.TeacherTargets(th, tw) for th, tw in members], torch.tensor([0.3, 0.7]))
    h, w, _, _, labels = _setup(30)
    runs = {}
    for name, numerics, kind in (("f32", L.LossNumerics(chunk_size=4), "forward_kl"),
                                 ("bf16", L.LossNumerics(chunk_size=4, matmul_dtype=torch.bfloat16), "forward_kl"),
                                 ("compiled", L.LossNumerics(chunk_size=4, compiled=True), "forward_kl"),
                                 ("f32_jsd", L.LossNumerics(chunk_size=4), "jsd"),
                                 ("bf16_jsd", L.LossNumerics(chunk_size=4, matmul_dtype=torch.bfloat16), "jsd")):
        runs[name] = L.chunked_distill_loss(h, w, target, labels=labels, loss=L.LogitLoss(kind=kind), numerics=numerics)
    assert torch.equal(runs["compiled"], runs["f32"])
    assert runs["bf16"].item() == pytest.approx(runs["f32"].item(), rel=3e-2)
    assert runs["bf16_jsd"].item() == pytest.approx(runs["f32_jsd"].item(), rel=3e-2)


def test_mixture_never_materialises_more_than_a_chunk():
    n, v, hs = 1024, 4096, 16
    g = torch.Generator().manual_seed(31)
    h = torch.randn(n, hs, generator=g, requires_grad=True)
    w = (torch.randn(v, hs, generator=g) * 0.2).requires_grad_(True)
    members = [L.TeacherTargets(torch.randn(n, ht, generator=g), torch.randn(v, ht, generator=g) * 0.2)
               for ht in (24, 8)]
    tv, ti = torch.randn(n, 8, generator=g), torch.randint(0, v, (n, 8), generator=g)
    weights = torch.rand(n, 3, generator=g)
    mode = _MaxNumel()
    with mode:
        target = L.TeacherTargets.mixture(members + [L.TeacherTargets(topk=(tv, ti))], weights)
        loss = L.chunked_distill_loss(h, w, target, numerics=L.LossNumerics(chunk_size=128))
        loss.backward()
    assert torch.isfinite(loss) and mode.max_numel <= 128 * v < n * v // 4


def test_mixture_argument_errors():
    (th, tw), (th2, tw2) = _members(32, (24, 8))
    h, w, _, _, labels = _setup(33)
    tv, ti = (th @ tw.t()).topk(4, dim=-1)
    live, cached = L.TeacherTargets(th, tw), L.TeacherTargets(topk=(tv, ti))
    with pytest.raises(ValueError, match="sampled tokens"):
        L.TeacherTargets.mixture([live, L.TeacherTargets(samples=(tv, ti))])
    with pytest.raises(ValueError, match="at least one member"):
        L.TeacherTargets.mixture([])
    with pytest.raises(ValueError, match="member 0 must be a live or top-k"):
        L.TeacherTargets.mixture([L.TeacherTargets.mixture([live])])
    with pytest.raises(ValueError, match="one per member"):
        L.TeacherTargets.mixture([live, cached], torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=">= 0"):
        L.TeacherTargets.mixture([live, cached], torch.tensor([1.0, -0.5]))
    with pytest.raises(ValueError, match="positive sum"):
        L.TeacherTargets.mixture([live, cached], torch.zeros(N, 2))
    with pytest.raises(ValueError, match="softcap"):
        L.TeacherTargets(members=(live,), member_weights=torch.ones(1), softcap=3.0)
    with pytest.raises(ValueError, match="forward_kl only"):
        L.chunked_distill_loss(h, w, L.TeacherTargets.mixture([live, cached]), loss=L.LogitLoss(kind="reverse_kl"))
    with pytest.raises(ValueError, match="full distribution"):
        L.chunked_distill_loss(h, w, L.TeacherTargets.mixture([live, cached]), loss=L.LogitLoss(kind="topk_kl"))
    with pytest.raises(ValueError, match="member 1: teacher weight"):
        L.chunked_distill_loss(h, w, L.TeacherTargets.mixture([live, L.TeacherTargets(th2, tw2[:-1])]))
    with pytest.raises(ValueError, match="weights have 3 tokens"):
        L.chunked_distill_loss(h, w, L.TeacherTargets.mixture([live, cached], torch.ones(3, 2)))


def test_a_soft_capped_teacher_of_an_uncapped_student_leaves_the_closed_form():
    """The closed form applies no teacher soft-cap: a capped teacher takes the autograd path (a student
    without the cap used to get the teacher's raw logits)."""
    h, w, th, tw, labels = _setup(34)
    _compare(h, w, L.TeacherTargets(th, tw, softcap=3.0), labels, numerics=L.LossNumerics(chunk_size=4),
             ref_kwargs=dict(tcap=3.0))
