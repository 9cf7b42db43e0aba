"""The data-aware inits EVA, CorDA and LoRA-GA (issue 13): the math equals PEFT 0.21.2's on identical
calibration batches (fp32, same process: PEFT is the oracle here only), the adapted model equals
the base at step 0, export loads in PEFT on the original base with our logits, resume is
bit-identical, calibration leaves the model's RNG, modes, flags and hooks as it found them, and bad
input is refused before the model changes.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import tiny_llama

from variants import corda as corda_math
from variants import lora_ga as lora_ga_math
from variants.eva import eva_components
from variants.targets import find_targets

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
R, ALPHA = 8, 16.0


def calibration_batches(n: int = 4, batch: int = 4, length: int = 12, seed: int = 1, vocab: int = 96):
    """Random token batches: the first half of each row unlabelled (-100), two padded tokens in row 0."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, length), generator=gen)
        labels = ids.clone()
        labels[:, : length // 2] = -100
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        labels[0, -2:] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _peft_lora(base, init, r=R, alpha=ALPHA, **kw):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(TARGETS), init_lora_weights=init, **kw)


def _peft_tensor(peft_model, layer: str, key: str) -> torch.Tensor:
    return dict(peft_model.named_parameters())[f"base_model.model.{layer}.{key}"].detach()


def peft_eva(base, batches, *, rho=2.0, whiten=False, **kw):
    from peft import get_peft_model
    from peft.tuners.lora import EvaConfig, initialize_lora_eva_weights

    model = get_peft_model(copy.deepcopy(base), _peft_lora(base, "eva", eva_config=EvaConfig(rho=rho, whiten=whiten),
                                                          **kw))
    initialize_lora_eva_weights(model, batches, show_progress_bar=False)
    return model


def peft_corda(base, batches, method, **kw):
    from peft import get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    model = copy.deepcopy(base)
    cfg = _peft_lora(base, "corda", corda_config=CordaConfig(corda_method=method), **kw)
    seqs = corda_math.sequences(batches)  # PEFT's hook needs one unpadded sequence per forward
    preprocess_corda(model, cfg, run_model=lambda: [model(input_ids=s) for s in seqs])
    return get_peft_model(model, cfg)


def peft_lora_ga(base, batches, direction="ArB2r", scale="stable", seed=0, **kw):
    """PEFT's LoRA-GA with each layer's init seeded as ours is (seed + the layer's index, forked RNG);
    PEFT itself draws from the global RNG. No zero_grad between batches (PEFT averages the sum)."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraGAConfig, preprocess_loraga
    from peft.tuners.lora.layer import LoraLayer

    model = copy.deepcopy(base)
    cfg = _peft_lora(base, "lora_ga", lora_ga_config=LoraGAConfig(direction=direction, scale=scale), **kw)
    preprocess_loraga(model, cfg, train_step=lambda: [model(**b).loss.backward() for b in batches])
    original, calls = LoraLayer.lora_ga_init, [0]

    def seeded(self, *args, **kwargs):
        with torch.random.fork_rng():
            torch.manual_seed(seed + calls[0])
            calls[0] += 1
            return original(self, *args, **kwargs)

    LoraLayer.lora_ga_init = seeded
    try:
        return get_peft_model(model, cfg)
    finally:
        LoraLayer.lora_ga_init = original


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def batches():
    return calibration_batches()


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own warnings (EVA's unsupported modules, ...)
        yield


# ----- 1. the math, function by function, against PEFT ------------------------------------------------
@pytest.mark.parametrize(("rho", "whiten"), [(2.0, False), (1.0, False), (2.0, True)])
def test_eva_components_and_ranks_equal_peft(base, batches, rho, whiten):
    theirs = peft_eva(base, batches, rho=rho, whiten=whiten)
    model = copy.deepcopy(base)
    modules = dict(find_targets(model, TARGETS))
    ours = eva_components(lambda b: model(**b), modules, batches, dict.fromkeys(modules, R), rho=rho, tau=0.99,
                          whiten=whiten)
    assert ours.ranks == {n: theirs.peft_config["default"].rank_pattern.get(n, R) for n in modules}
    if rho > 1:
        assert len(set(ours.ranks.values())) > 1, "the rank redistribution moved nothing: a vacuous check"
    assert ours.shared_inputs  # q/k/v and gate/up share one PCA
    plain = eva_components(lambda b: model(**b), modules, batches, dict.fromkeys(modules, R), rho=rho, tau=0.99) \
        if whiten else ours
    members: dict[str, list[str]] = {}
    for member, leader in ours.shared_inputs.items():
        members.setdefault(leader, [leader]).append(member)
    for name, a in ours.components.items():
        peft_a = _peft_tensor(theirs, name, "lora_A.default.weight")
        assert a.shape == peft_a.shape == (ours.ranks[name], 32 if "down" not in name else 48)
        group = members.get(ours.shared_inputs.get(name, name), [name])
        if not whiten or len(group) == 1:
            assert torch.equal(a.float(), peft_a), name
        else:
            # PEFT divides by sqrt(S) in place on a view of the shared PCA, once per member of the
            # group: row i of its A is divided once per member whose rank exceeds i, so it is ours
            # times S_i^-(m_i-1)/2 (docs/init-data-aware.md). Ours divides once.
            root = a / plain.components[name]  # S^-1/2, row by row
            assert torch.allclose(root.std(dim=1), torch.zeros(a.shape[0], dtype=root.dtype), atol=1e-9)
            extra = torch.tensor([sum(ours.ranks[m] > i for m in group) - 1 for i in range(a.shape[0])])
            assert extra.max() > 0  # the check below sees PEFT's repeated division
            expected = a * root ** extra.view(-1, 1).to(root.dtype)
            torch.testing.assert_close(peft_a.double(), expected.double(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_factors_equal_peft(base, batches, method):
    theirs = peft_corda(base, batches, method)
    model = copy.deepcopy(base)
    modules = dict(find_targets(model, TARGETS))
    covs, leader = corda_math.covariances(lambda ids: model(input_ids=ids), modules, corda_math.sequences(batches))
    assert len(covs) == 8  # q/k/v and gate/up share: 2 blocks x (qkv, o, gate/up, down)
    for name, module in modules.items():
        fixed, inverse, _ = corda_math.damped_inverse(covs[leader[name]])
        a, b = corda_math.corda_factors(module.weight, fixed, inverse, R, ALPHA / R, method)
        assert torch.equal(a, _peft_tensor(theirs, name, "lora_A.default.weight")), name
        assert torch.equal(b, _peft_tensor(theirs, name, "lora_B.default.weight")), name


@pytest.mark.parametrize("direction", lora_ga_math.LORA_GA_DIRECTIONS)
@pytest.mark.parametrize("scale", lora_ga_math.LORA_GA_SCALES)
def test_lora_ga_factors_equal_peft(base, batches, direction, scale):
    theirs = peft_lora_ga(base, batches, direction, scale, seed=7)
    model = copy.deepcopy(base)
    modules = dict(find_targets(model, TARGETS))
    model.requires_grad_(False)
    weights = {n: m.weight for n, m in modules.items()}
    for w in weights.values():
        w.requires_grad_(True)
    model.train()
    grads = lora_ga_math.estimate_gradients(model, weights, batches, lambda m, b: m(**b).loss, modules)
    assert all(w.grad is None for w in weights.values())
    for index, (name, module) in enumerate(modules.items()):
        with torch.random.fork_rng():
            torch.manual_seed(7 + index)
            a, b = lora_ga_math.lora_ga_factors(grads[name], module.weight.detach(), R, ALPHA / R,
                                                direction=direction, scale_mode=scale)
        assert torch.equal(a, _peft_tensor(theirs, name, "lora_A.default.weight")), name
        assert torch.equal(b, _peft_tensor(theirs, name, "lora_B.default.weight")), name
