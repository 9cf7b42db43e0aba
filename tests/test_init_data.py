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


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # EVA runs ~80 forwards of tiny matrices (QR/SVD of ~40 x 32): a second thread only adds
    # synchronisation, which on a loaded 2-core machine made these tests 10x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# ----- 2. the parts: build + calibrate equals PEFT (A, B, W_res, DoRA's magnitude, EVA's ranks/alphas) -------
import json  # noqa: E402

import variants  # noqa: E402
from variants.checkpoint import Checkpointer  # noqa: E402

CASES = {  # our spec options -> PEFT's side
    "eva": ({"preset": "eva"}, lambda base, b, **kw: peft_eva(base, b, **kw)),
    "corda_ipm": ({"preset": "corda"}, lambda base, b, **kw: peft_corda(base, b, "ipm", **kw)),
    "corda_kpm": ({"preset": "corda", "corda_method": "kpm"}, lambda base, b, **kw: peft_corda(base, b, "kpm", **kw)),
    "lora_ga": ({"preset": "lora_ga"}, lambda base, b, **kw: peft_lora_ga(base, b, **kw)),
}
LAYERS = {"lora": ({}, {}), "dora": ({"layer": "dora"}, {"use_dora": True}),
          "rslora": ({"scaling": "rslora"}, {"use_rslora": True})}


def spec_of(case: str, layer: str = "lora", **options) -> dict:
    return {**CASES[case][0], **LAYERS[layer][0], "r": R, "alpha": ALPHA, "target_modules": list(TARGETS), **options}


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def calibrated(base, case, layer="lora", batches=None, **options):
    adapted = variants.build(copy.deepcopy(base), spec_of(case, layer, **options))
    info = adapted.calibrate(batches if batches is not None else calibration_batches())
    return adapted, info


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_calibrated_part_equals_peft(base, batches, case, layer):
    adapted, info = calibrated(base, case, layer, batches)
    assert info["batches"] == 4 and info["forwards"] > 0
    theirs = CASES[case][1](base, batches, **LAYERS[layer][1])
    peft_layers = {n: m for n, m in theirs.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    prefix = "base_model.model."
    assert sorted(adapted.layers) == sorted(n[len(prefix):] for n in peft_layers)
    for name, layer_ in adapted.layers.items():
        twin = peft_layers[prefix + name]
        pairs = [(layer_.lora_A, twin.lora_A["default"].weight), (layer_.lora_B, twin.lora_B["default"].weight),
                 (layer_.base_layer.weight, twin.base_layer.weight)]
        if layer == "dora":
            pairs.append((layer_.magnitude, twin.lora_magnitude_vector["default"].weight))
        for ours, peft_tensor in pairs:
            assert ours.shape == peft_tensor.shape, name
            torch.testing.assert_close(ours.detach(), peft_tensor.detach(), atol=1e-6, rtol=0)
        assert layer_.scale == pytest.approx(twin.scaling["default"], rel=1e-12), name
    if case == "eva":
        assert adapted.rank_pattern() == theirs.peft_config["default"].rank_pattern
        assert info["ranks"] == {n: ly.r for n, ly in adapted.layers.items()}


# ----- 3. step 0: the adapted model equals the base ---------------------------------------------------------
@pytest.mark.parametrize(("case", "layer"), [("eva", "lora"), ("eva", "dora"), ("corda_ipm", "lora"),
                                             ("corda_kpm", "dora"), ("lora_ga", "lora"), ("lora_ga", "dora")])
def test_adapted_model_equals_the_base_after_calibration(base, case, layer):
    ids = calibration_batches(1, seed=9)[0]["input_ids"]
    expected = logits(base, ids)
    adapted, _ = calibrated(base, case, layer)
    if case != "eva":  # the residual really moved W (else the check is vacuous)
        name = next(iter(adapted.layers))
        assert not torch.equal(adapted.layers[name].base_layer.weight, base.get_submodule(name).weight)
    torch.testing.assert_close(logits(adapted.model, ids), expected, atol=1e-5, rtol=0)


# ----- 4. export -> PeftModel on the ORIGINAL base, and our own save/load --------------------------------------
def _with_a_rank_zero_layer(monkeypatch, layer_name):
    """EVA's redistribution gives no layer of the tiny random Llama rank 0; move one layer's rank to its
    group leader's budget after the real computation, to exercise the rank-0 path (PEFT drops the layer)."""
    from variants import eva

    real = eva.eva_components

    def patched(*args, **kwargs):
        result = real(*args, **kwargs)
        result.components[layer_name] = result.components[layer_name][:0]
        result.ranks[layer_name] = 0
        return result

    monkeypatch.setattr(eva, "eva_components", patched)


@pytest.mark.parametrize(("case", "layer"), [("eva", "lora"), ("eva", "rslora"), ("corda_ipm", "lora"),
                                             ("lora_ga", "lora"), ("lora_ga", "dora")])
def test_export_loads_in_peft_on_the_original_base(base, case, layer, tmp_path, monkeypatch):
    from conftest import randomize_adapter
    from peft import PeftModel

    dropped = "model.layers.1.self_attn.o_proj"
    if case == "eva":
        _with_a_rank_zero_layer(monkeypatch, dropped)
    adapted, _ = calibrated(base, case, layer)
    randomize_adapter(adapted, seed=2)  # stands in for training
    ids = calibration_batches(1, seed=9)[0]["input_ids"]
    ours = logits(adapted.model, ids)
    variants.export_peft(adapted, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    if case == "eva":
        assert dropped not in config["target_modules"] and dropped in adapted.unadapted
        assert config["r"] == R and config["rank_pattern"]  # per-layer ranks, plain LoRA
        if layer == "rslora":  # s_k = alpha·sqrt(r_k)/r: alpha_pattern carries it
            assert config["alpha_pattern"]
    else:
        assert config["r"] == 2 * R  # [A; A0], [B, -B0] against the original base
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded, ids), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["eva", "lora_ga"])
def test_save_load_needs_no_calibration(base, case, tmp_path, monkeypatch):
    from conftest import randomize_adapter

    if case == "eva":
        _with_a_rank_zero_layer(monkeypatch, "model.layers.0.mlp.down_proj")
    adapted, _ = calibrated(base, case)
    randomize_adapter(adapted, seed=3)
    ids = calibration_batches(1, seed=9)[0]["input_ids"]
    variants.save(adapted, tmp_path / "ours")

    def no_calibration(*args, **kwargs):
        raise AssertionError("load must not calibrate")

    monkeypatch.setattr(variants.eva, "eva_components", no_calibration)
    monkeypatch.setattr(variants.lora_ga, "estimate_gradients", no_calibration)
    loaded = variants.load(copy.deepcopy(base), tmp_path / "ours")
    assert not loaded.needs_calibration
    assert loaded.rank_pattern() == adapted.rank_pattern()
    assert torch.equal(logits(loaded.model, ids), logits(adapted.model, ids))


# ----- 5. checkpoint resume is bit-identical ---------------------------------------------------------------
class _Stop(Exception):
    pass


def _train(base, case, folder=None, stop_after=None, calibration_seed=1):
    adapted, _ = calibrated(base, case, batches=calibration_batches(seed=calibration_seed), r=4, alpha=8.0)
    train = calibration_batches(6, seed=5)

    def on_step(record):
        if stop_after is not None and record.step + 1 == stop_after:
            raise _Stop

    checkpoint = Checkpointer(folder, 2, "run") if folder is not None else None
    variants.train(adapted, train, variants.TrainSettings(steps=6, lr=1e-2), on_step=on_step, checkpoint=checkpoint)
    return adapted


@pytest.mark.parametrize("case", ["eva", "lora_ga"])
def test_checkpoint_resume_is_bit_identical(base, case, tmp_path):
    reference = _train(base, case)
    with pytest.raises(_Stop):
        _train(base, case, tmp_path / "ckpt", stop_after=3)
    resumed = _train(base, case, tmp_path / "ckpt")
    for key, tensor in reference.adapter_state_dict().items():
        assert torch.equal(resumed.adapter_state_dict()[key], tensor), key
    for name, layer in reference.layers.items():
        assert torch.equal(resumed.layers[name].base_layer.weight, layer.base_layer.weight), name
    # a run that calibrated on other batches cannot resume from this checkpoint
    # (EVA: its ranks differ, so the layer shapes already do)
    with pytest.raises(ValueError, match="differ from the checkpoint|has shape"):
        _train(base, case, tmp_path / "ckpt", calibration_seed=2)


# ----- 6. calibration hygiene -----------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["eva", "corda_ipm", "lora_ga"])
def test_calibration_leaves_rng_modes_flags_and_hooks_as_they_were(base, case):
    torch.manual_seed(11)
    variants.build(copy.deepcopy(base), {"preset": "lora", "r": R, "alpha": ALPHA, "target_modules": list(TARGETS)})
    after_lora = torch.random.get_rng_state()
    torch.manual_seed(11)
    adapted = variants.build(copy.deepcopy(base), spec_of(case))
    adapted.model.train()
    adapted.model.model.layers[0].eval()  # a mix of modes, restored module by module
    modes = {n: m.training for n, m in adapted.model.named_modules()}
    flags = {n: p.requires_grad for n, p in adapted.model.named_parameters()}
    six = calibration_batches(6)
    adapted.calibrate(six[:4] + [{"input_ids": torch.full((2, 3), 10**6)}] * 2)  # only the first 4 are used
    assert torch.equal(torch.random.get_rng_state(), after_lora)
    assert {n: m.training for n, m in adapted.model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in adapted.model.named_parameters()} == flags
    assert all(p.grad is None for p in adapted.model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in adapted.model.modules())
    assert not any(layer.bypassed for layer in adapted.layers.values())
    same, _ = calibrated(base, case, batches=six[:4])
    for key, tensor in same.adapter_state_dict().items():
        assert torch.equal(adapted.adapter_state_dict()[key], tensor), key


# ----- 7. refusals: a ValueError naming the value, before the model changes -----------------------------------
def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(before, model):
    after = model.state_dict()
    return set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(("changes", "match"), [
    ({"preset": "eva", "r": 12, "eva_rho": 3.0}, r"r·eva_rho = 12·3 -> 36 components.*in_features=32"),
    ({"preset": "lora_ga", "r": 9}, r"init=lora_ga: r=9 needs 18 directions.*k_proj"),
    ({"preset": "corda", "r": 17}, r"init=corda: r=17 needs 17 directions"),
])
def test_ranks_a_layer_cannot_hold_are_refused_at_build(base, changes, match):
    model = copy.deepcopy(base)
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        variants.build(model, {"r": R, "alpha": ALPHA, "target_modules": list(TARGETS), **changes})
    assert _unchanged(before, model) and not any(hasattr(m, "lora_A") for m in model.modules())


@pytest.mark.parametrize(("case", "batches", "match"), [
    ("eva", calibration_batches(3), r"init=eva needs init_batches=4 calibration batches, got 3"),
    ("lora_ga", calibration_batches(2), r"init=lora_ga needs init_batches=4 calibration batches, got 2"),
    ("eva", [{**b, "labels": torch.full_like(b["labels"], -100)} for b in calibration_batches()],
     r"init=eva: the calibration batches have \[0, 0, 0, 0\] labelled"),
    ("lora_ga", [{**b, "labels": torch.full_like(b["labels"], -100)} for b in calibration_batches()],
     r"init=lora_ga: calibration batch 0 has no label tokens"),
    ("corda_ipm", [{**b, "attention_mask": torch.zeros_like(b["attention_mask"])} for b in calibration_batches()],
     r"init=corda: the calibration batches have no attended tokens"),
])
def test_bad_calibration_batches_are_refused_before_any_change(base, case, batches, match):
    adapted = variants.build(copy.deepcopy(base), spec_of(case))
    before = _state(adapted.model)
    with pytest.raises(ValueError, match=match):
        adapted.calibrate(batches)
    assert _unchanged(before, adapted.model) and adapted.needs_calibration


@pytest.mark.parametrize(("changes", "named"), [
    ({"preset": "corda", "base": "nf4"}, ("init=corda", "base=nf4")),
    ({"preset": "lora_ga", "layer": "vera"}, ("init=lora_ga", "layer=vera")),
    ({"preset": "corda", "layer": "sora"}, ("init=corda", "layer=sora")),
    ({"preset": "eva", "layer": "adalora", "r": 12, "total_step": 10}, ("init=eva", "layer=adalora")),
    ({"preset": "eva", "layer": "sora"}, ("init=eva", "layer=sora")),
])
def test_unsound_combinations_name_both_parts(changes, named):
    with pytest.raises(ValueError) as err:
        variants.AdapterSpec.from_dict(changes)
    assert all(part in str(err.value) for part in named)


def test_training_before_calibration_and_calibrating_twice_are_refused(base):
    adapted = variants.build(copy.deepcopy(base), spec_of("lora_ga"))
    with pytest.raises(ValueError, match=r"init=lora_ga needs 4 calibration batches: call adapted.calibrate"):
        variants.train(adapted, calibration_batches(), variants.TrainSettings(steps=1, lr=1e-3))
    adapted.calibrate(calibration_batches())
    with pytest.raises(ValueError, match="already calibrated"):
        adapted.calibrate(calibration_batches())


def test_eva_stops_at_max_passes_with_the_unconverged_layers_recorded(base):
    with pytest.warns(UserWarning, match=r"eva_max_passes=1"):
        adapted, info = calibrated(base, "eva", eva_max_passes=1)
    assert info["forwards"] == 1 + 4  # the hash pass, then one pass over the 4 batches
    assert info["unconverged"] and set(info["unconverged"]) <= set(info["ranks"])
    assert sum(info["ranks"].values()) == R * len(TARGETS) * 2  # the rank budget is still spent
