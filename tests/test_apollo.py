"""APOLLO and APOLLO-Mini pinned by the properties the docstrings promise. There is no
lightweight reference to compare with: the official apollo-torch needs transformers and
bitsandbytes."""
import copy

import pytest
import torch
from torch import nn

import optim
from tiny_models import batches, make_model, max_rel_diff, train
from tolerance import F32_COMPUTATION, F64_COMPUTATION, check

NAMES = ("apollo", "apollo_mini")
STATE_KEYS = {"step", "seed", "exp_avg", "exp_avg_sq", "update_norm"}   # P is not among them


def signed_permutation(k, seed):
    """An orthogonal k x k matrix that permutes coordinates and flips some signs. AdamW's
    elementwise moments commute with it; with a general rotation they would not."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(2, (k, 1), generator=g).double() * 2 - 1
    return torch.eye(k, dtype=torch.float64)[torch.randperm(k, generator=g)] * signs


def all_params(opt):
    """The parameters of every group, in order: a parameter's index is its place here."""
    return [p for group in opt.param_groups for p in group["params"]]


def one_step_update(shape, granularity, last_norm, alpha=4.0):
    """(theta_0 - theta_1, the stored update norm) for one apollo_update from a fixed state."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(shape, generator=g, dtype=torch.float64)
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    proj = optim.random_projection(2, min(shape), seed=0, regeneration=0).double()
    r_shape = (shape[0], 2) if shape[0] >= shape[1] else (2, shape[1])
    m, v = torch.zeros(r_shape, dtype=torch.float64), torch.zeros(r_shape, dtype=torch.float64)
    norm = torch.tensor(last_norm, dtype=torch.float64)
    p = theta.clone()
    optim.apollo_update(p, grad, proj, m, v, norm, 0 if shape[0] >= shape[1] else 1,
                        **optim.adam_step_numbers(1, 1.0, 0.9, 0.999), beta1=0.9, beta2=0.999,
                        eps=1e-8, weight_decay=0.0, granularity=granularity, alpha=alpha)
    return theta - p, norm


@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (6, 6)])
@pytest.mark.parametrize("granularity", optim.GRANULARITIES)
def test_full_rank_orthogonal_projection_reproduces_adamw_update_norms(granularity, shape):
    """With r = k and P orthogonal (a signed permutation), s_j = ||R~_j|| / ||R_j|| equals
    AdamW's ||update_j|| / ||G_j||: APOLLO moves each channel (APOLLO-Mini the whole tensor) by
    exactly AdamW's update norm, along the gradient. The limiter is off (no previous norm)."""
    g = torch.Generator().manual_seed(0)
    apollo_p = torch.randn(shape, generator=g, dtype=torch.float64)
    adamw_p = apollo_p.clone()
    proj = signed_permutation(min(shape), seed=1)
    m, v, m_ref, v_ref = (torch.zeros(shape, dtype=torch.float64) for _ in range(4))
    hp = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    dim = 1 if shape[0] >= shape[1] else 0          # the projected dimension
    for step in range(1, 9):
        row_scales = torch.rand(shape[0], 1, generator=g, dtype=torch.float64)
        grad = torch.randn(shape, generator=g, dtype=torch.float64) * row_scales
        before, before_ref = apollo_p.clone(), adamw_p.clone()
        numbers = optim.adam_step_numbers(step, 1.0, 0.9, 0.999)
        optim.apollo_update(apollo_p, grad, proj, m, v, torch.zeros((), dtype=torch.float64),
                            1 - dim, **numbers, **hp, granularity=granularity, alpha=1.0)
        optim.adamw_update(adamw_p, grad, m_ref, v_ref, **numbers, **hp)
        update, update_ref = before - apollo_p, before_ref - adamw_p
        family = "APOLLO at full rank = AdamW's update norms, float64"
        if granularity == "channel":
            check(family, update.norm(dim=dim), update_ref.norm(dim=dim), F64_COMPUTATION)
            along_grad = grad * (update.norm(dim=dim, keepdim=True) /
                                 grad.norm(dim=dim, keepdim=True))
        else:
            check(family, update.norm(), update_ref.norm(), F64_COMPUTATION)
            along_grad = grad * (update.norm() / grad.norm())
        check(family, update, along_grad, F64_COMPUTATION)


@pytest.mark.parametrize("granularity", optim.GRANULARITIES)
def test_limiter_caps_update_norm_growth_at_1_01(granularity):
    free, free_norm = one_step_update((16, 8), granularity, last_norm=0.0)   # no previous norm
    family = "APOLLO's limiter, one step, float64"
    check(family, free_norm, free.norm(), F64_COMPUTATION)

    capped, capped_norm = one_step_update((16, 8), granularity, last_norm=0.5 * free_norm.item())
    check(family, capped.norm(), 1.01 * 0.5 * free_norm, F64_COMPUTATION)
    check(family, capped_norm, capped.norm(), F64_COMPUTATION)
    check(family, capped, free * (capped.norm() / free.norm()),
          F64_COMPUTATION)                                        # only shorter

    slower, _ = one_step_update((16, 8), granularity, last_norm=free_norm.item() / 1.005)
    torch.testing.assert_close(slower, free, rtol=0, atol=0)     # growth 1.005: untouched


@pytest.mark.parametrize("name", NAMES)
def test_update_norms_grow_at_most_1_01_per_step_in_training(name):
    model = make_model()
    opt = optim.build_optimizer(name, model, lr=1e-2, weight_decay=0.1)
    matrices = optim.projected_params(model)
    history = []
    for xy in batches(15):
        train(model, opt, [xy])
        history.append(torch.stack([opt.state[p]["update_norm"] for p in matrices]))
    growth = torch.stack(history[1:]) / torch.stack(history[:-1])
    # float32 norms and their ratio round by a few u; unlimited, growth reaches ~1.5 here
    assert growth.max().item() <= 1.01 * (1 + F32_COMPUTATION)
    assert (growth > 1.01 * (1 - F32_COMPUTATION)).any()        # the limiter did act


def test_limiter_ignores_the_learning_rate():
    """The limiter compares norms before the lr: a warmup that multiplies the lr by 10 at each
    step gives the same limited norms (so the same directions) as a constant lr."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(16, 8, generator=g) for _ in range(6)]
    norms = []
    for lr_growth in (1.0, 10.0):
        p = nn.Parameter(torch.zeros(16, 8))
        opt = optim.Apollo([p], lr=1e-6, rank=2, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_growth ** t)
        norms.append([])
        for grad in grads:
            p.grad = grad
            opt.step()
            scheduler.step()
            norms[-1].append(opt.state[p]["update_norm"].item())
    assert norms[0] == norms[1]


@pytest.mark.parametrize("name", NAMES)
def test_projection_is_identical_after_state_dict_round_trip(name):
    model = make_model()
    opt = optim.build_optimizer(name, model, lr=1e-2, update_proj_gap=3)
    train(model, opt, batches(5))                   # step 5: the second projection
    resumed_model = make_model(seed=123)
    resumed_model.load_state_dict(model.state_dict())
    resumed = optim.build_optimizer(name, resumed_model, lr=1e-2)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    pairs = zip(optim.projected_params(model), optim.projected_params(resumed_model))
    for p, q in pairs:
        assert set(opt.state[p]) == STATE_KEYS
        assert torch.equal(resumed.projection(q, resumed.param_groups[0]),
                           opt.projection(p, opt.param_groups[0]))


@pytest.mark.parametrize("name", NAMES)
def test_resume_is_exact_across_projection_regenerations(name):
    """Save at step 4 (mid-way through the second projection), continue to step 12: P is redrawn
    at steps 7 and 10 from the state alone, and losses and weights match bit for bit."""
    model = make_model()
    opt = optim.build_optimizer(name, model, lr=1e-2, weight_decay=0.1, update_proj_gap=3)
    data = batches(12)
    train(model, opt, data[:4])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    uninterrupted = train(model, opt, data[4:])

    resumed = make_model(seed=123)
    resumed.load_state_dict(saved_model)
    resumed_opt = optim.build_optimizer(name, resumed, lr=5.0, update_proj_gap=50)
    resumed_opt.load_state_dict(saved_opt)          # update_proj_gap = 3 comes back too
    assert train(resumed, resumed_opt, data[4:]) == uninterrupted
    assert max_rel_diff(resumed, model) == 0.0


def test_projection_is_redrawn_every_update_proj_gap_steps():
    model = make_model()
    opt = optim.build_optimizer("apollo", model, lr=1e-2, update_proj_gap=3)
    group = opt.param_groups[0]
    q, k = model.blocks[0].q_proj.weight, model.blocks[0].k_proj.weight
    seen = []
    for xy in batches(7):
        train(model, opt, [xy])
        seen.append(opt.projection(q, group).clone())
    assert torch.equal(seen[0], seen[2]) and torch.equal(seen[3], seen[5])   # steps 1-3, 4-6
    assert not torch.equal(seen[2], seen[3]) and not torch.equal(seen[5], seen[6])
    assert not torch.equal(opt.projection(k, group), seen[6])   # each matrix has its own P
    assert seen[0].shape == (8, 32)                              # r = 32 / 4
    assert torch.equal(seen[3], optim.random_projection(8, 32, opt.state[q]["seed"], 1))


def test_random_projection_entries_are_normal_with_variance_one_over_rank():
    proj = optim.random_projection(64, 512, seed=3, regeneration=7)
    assert proj.shape == (64, 512) and proj.dtype == torch.float32
    assert abs(proj.mean().item()) < 0.005                      # standard error 0.0007
    assert proj.var().item() == pytest.approx(1 / 64, rel=0.05)  # standard error 0.8%
    assert torch.equal(proj, optim.random_projection(64, 512, seed=3, regeneration=7))
    assert not torch.equal(proj, optim.random_projection(64, 512, seed=3, regeneration=8))
    assert not torch.equal(proj, optim.random_projection(64, 512, seed=4, regeneration=7))


def test_moments_are_kept_when_the_projection_is_redrawn():
    """As the official code: at a regeneration m and v continue, fed the gradient projected
    with the new P."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(16, 8))
    opt = optim.Apollo([p], lr=1e-2, rank=2, update_proj_gap=2, weight_decay=0.0)
    for _ in range(2):
        p.grad = torch.randn(16, 8)
        opt.step()
    m_before = opt.state[p]["exp_avg"].clone()
    v_before = opt.state[p]["exp_avg_sq"].clone()
    p.grad = torch.randn(16, 8)
    opt.step()                                      # step 3: a new P
    r_grad = p.grad @ opt.projection(p, opt.param_groups[0]).T
    family = "APOLLO's moments after a new projection, float32"
    check(family, opt.state[p]["exp_avg"], 0.9 * m_before + 0.1 * r_grad, F32_COMPUTATION)
    check(family, opt.state[p]["exp_avg_sq"], 0.999 * v_before + 0.001 * r_grad ** 2,
          F32_COMPUTATION)


@pytest.mark.parametrize("name", NAMES)
def test_other_tensors_get_exactly_adamws_update(name):
    """Embeddings, head, norms and biases: bit for bit what optim.AdamW does with the same
    gradients; the projected matrices move differently."""
    ours, ref = make_model(), make_model()
    opt = optim.build_optimizer(name, ours, lr=1e-2, weight_decay=0.1)
    ref_opt = optim.build_optimizer("adamw", ref, lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        for p, q in zip(ours.parameters(), ref.parameters()):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    projected = set(optim.projected_params(ours))
    for (name_, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(p, q) != (p in projected), name_


@pytest.mark.parametrize("name,rank,granularity,alpha", [("apollo", 8, "channel", 1.0),
                                                        ("apollo_mini", 1, "tensor", 128.0)])
def test_build_optimizer_projects_the_attention_and_mlp_matrices(name, rank, granularity, alpha):
    model = make_model()
    opt = optim.build_optimizer(name, model, lr=1e-3)
    train(model, opt, batches(1))
    kinds = optim.param_kinds(model)
    for group in opt.param_groups:
        for p, projected in zip(group["params"], group["projected"]):
            assert projected == (kinds[p] in ("qk", "v", "proj", "mlp") and p.dim() == 2)
            if projected:
                assert (group["granularity"], group["alpha"]) == (granularity, alpha)
                assert set(opt.state[p]) == STATE_KEYS
    block = model.blocks[0]
    assert opt.state[block.q_proj.weight]["exp_avg"].shape == (32, rank)      # 32 x 32
    assert opt.state[block.mlp[0].weight]["exp_avg"].shape == (128, rank)     # 128 x 32
    assert opt.state[block.mlp[2].weight]["exp_avg_sq"].shape == (rank, 128)  # 32 x 128
    assert set(opt.state[model.embed.weight]) == {"step", "exp_avg", "exp_avg_sq"}


def test_plain_apollo_projects_every_matrix():
    model = make_model()
    opt = optim.Apollo(model.parameters(), lr=1e-3)
    assert opt.param_groups[0]["projected"] == [p.dim() == 2 for p in model.parameters()]


@pytest.mark.parametrize("name", NAMES)
def test_build_optimizer_rejects_unknown_hyperparameters(name):
    allowed = r"\['lr', 'betas', 'eps', 'weight_decay', 'rank', 'alpha', 'update_proj_gap', "
    with pytest.raises(TypeError, match=r"does not take \['momentum'\]; it takes " + allowed):
        optim.build_optimizer(name, make_model(), lr=1e-3, momentum=0.9)
    with pytest.raises(TypeError, match=r"does not take \['granularity'\]"):   # the name says it
        optim.build_optimizer(name, make_model(), lr=1e-3, granularity="channel")


BAD_HPARAMS = [
    ("apollo", {"rank": 0}, r"rank=0 is not allowed: it must be an int >= 1"),
    ("apollo_mini", {"rank": -1}, r"rank=-1 .*int >= 1"),
    ("apollo", {"rank": 2.5}, r"rank=2\.5 .*int >= 1"),
    ("apollo", {"rank": True}, r"rank=True .*int >= 1"),
    ("apollo", {"alpha": 0.0}, r"alpha=0\.0 is outside the allowed range \(0\.0, inf\]"),
    ("apollo_mini", {"alpha": -128.0}, r"alpha=-128\.0 .*\(0\.0, inf\]"),
    ("apollo", {"update_proj_gap": 0}, r"update_proj_gap=0 .*int >= 1"),
    ("apollo_mini", {"update_proj_gap": 1.5}, r"update_proj_gap=1\.5 .*int >= 1"),
    ("apollo", {"proj_seed": -1}, r"proj_seed=-1 .*int >= 0"),
    ("apollo_mini", {"betas": (0.9, 1.0)}, r"betas\[1\]=1\.0 .*\[0\.0, 1\.0\)"),
    ("apollo", {"eps": -1e-8}, r"eps=-1e-08"),
]


@pytest.mark.parametrize("name,hparams,message", BAD_HPARAMS)
def test_bad_hyperparameters_raise_specific_errors(name, hparams, message):
    with pytest.raises(ValueError, match=message):
        optim.build_optimizer(name, make_model(), **{"lr": 1e-3, **hparams})


def test_bad_granularity_and_projected_vector_raise_specific_errors():
    model = make_model()
    with pytest.raises(ValueError, match=r"granularity='row' is not one of \('channel', 'tensor"):
        optim.Apollo(model.parameters(), granularity="row")
    with pytest.raises(ValueError, match=r"norm_f\.weight: has shape \(32,\)"):
        optim.Apollo(model.named_parameters(), projected=[model.norm_f.weight])


@pytest.mark.parametrize("name", NAMES)
def test_matrix_without_grad_is_skipped_and_keeps_its_seed(name):
    """A projected matrix whose .grad is None gets no state and no update (not even weight
    decay); its seed, taken at its first gradient, is still proj_seed + its index."""
    model = make_model()
    opt = optim.build_optimizer(name, model, lr=1e-2, weight_decay=0.1, proj_seed=100)
    q = model.blocks[1].q_proj.weight
    before = q.detach().clone()
    xy = batches(1)[0]
    nn.functional.cross_entropy(model(xy[:, :-1]).flatten(0, 1), xy[:, 1:].flatten()).backward()
    q.grad = None
    opt.step()
    assert not opt.state.get(q) and torch.equal(q, before)
    assert all(opt.state.get(p) for p in model.parameters() if p is not q)
    opt.zero_grad(set_to_none=True)
    train(model, opt, batches(1))
    index = [i for i, p in enumerate(all_params(opt)) if p is q][0]
    assert opt.state[q]["seed"] == 100 + index and opt.state[q]["step"] == 1


@pytest.mark.parametrize("name,lr", [("apollo", 1e-2), ("apollo_mini", 1e-2)])
def test_loss_decreases(name, lr):
    model = make_model()
    losses = train(model, optim.build_optimizer(name, model, lr=lr, weight_decay=0.1),
                   batches(30))
    assert sum(losses[-5:]) / 5 < losses[0] - 0.1


def test_state_bytes_exact():
    """TinyLM (width 32, 2 layers) float32. Per layer the projected matrices are q, k, v, o
    (32 x 32) and the MLP's 128 x 32 and 32 x 128: k = 32, N = 32 or 128, and each keeps
    2 r N + 1 floats (m, v and the limiter's norm). The other 4,352 parameters keep AdamW's
    2 floats each."""
    others = 28_928 - 2 * (4 * 32 * 32 + 2 * 128 * 32)
    assert others == 4_352

    def floats(r):
        return 2 * (4 * (2 * r * 32 + 1) + 2 * (2 * r * 128 + 1)) + 2 * others

    counts = {}
    for name in NAMES:
        model = make_model()
        opt = optim.build_optimizer(name, model, lr=1e-3)
        train(model, opt, batches(1))
        counts[name] = optim.state_bytes(opt)
        projected = optim.projected_params(model)
        r = 8 if name == "apollo" else 1
        assert optim.state_bytes(opt, projected) == 4 * sum(2 * r * max(p.shape) + 1
                                                            for p in projected)
    assert counts["apollo"] == 4 * floats(8) == 84_016
    assert counts["apollo_mini"] == 4 * floats(1) == 41_008
