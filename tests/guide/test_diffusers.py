"""diffusers interop: parity of the pointwise rules with diffusers' guiders (float32, 1e-6), gradkit rules as
diffusers guiders, and gradkit's sampler driving tiny randomly initialised diffusers models (no downloads)."""

import logging

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is the optional extra gradkit[diffusers]")

import gradkit.guide as G  # noqa: E402
from gradkit.integrations.diffusers import DiffusersFlowModel, GradkitGuider, flow_times  # noqa: E402

logging.getLogger("diffusers").setLevel(logging.ERROR)  # "Guiders are experimental" on every construction

from diffusers.guiders import (  # noqa: E402
    AdaptiveProjectedGuidance,
    ClassifierFreeGuidance,
    ClassifierFreeZeroStarGuidance,
)
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer  # noqa: E402


def preds(seed, shape=(3, 4, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def ours(rule, c, u, step):
    return rule.combine(c, u, step=step) if isinstance(rule, G.CFGZeroStar) else rule.combine(c, u)


@pytest.mark.parametrize("original", [False, True])
def test_cfg_parity(original):
    c, u = preds(0)
    ref = ClassifierFreeGuidance(guidance_scale=4.5, use_original_formulation=original)
    ref.set_state(0, 10, torch.tensor(500))
    rule = G.CFG(4.5, formulation="original" if original else "diffusers")
    assert torch.allclose(rule.combine(c, u), ref.forward(c, u).pred, atol=1e-6, rtol=0)


@pytest.mark.parametrize("original", [False, True])
def test_cfg_zero_star_parity(original):
    ref = ClassifierFreeZeroStarGuidance(guidance_scale=5.0, zero_init_steps=2, use_original_formulation=original)
    rule = G.CFGZeroStar(5.0, zero_init_steps=2, formulation="original" if original else "diffusers")
    for step in range(5):
        c, u = preds(step)
        ref.set_state(step, 10, torch.tensor(1000 - 100 * step))
        assert torch.allclose(ours(rule, c, u, step), ref.forward(c, u).pred, atol=1e-6, rtol=0), step


@pytest.mark.parametrize("momentum", [None, -0.5, 0.3])
@pytest.mark.parametrize("eta", [0.0, 1.0, 0.4])
@pytest.mark.parametrize("r", [0.0, 2.5])
def test_apg_parity_diffusers_form(momentum, eta, r):
    ref = AdaptiveProjectedGuidance(guidance_scale=6.0, adaptive_projected_guidance_momentum=momentum,
                                    adaptive_projected_guidance_rescale=r, eta=eta)
    rule = G.APG(6.0, eta=eta, momentum=momentum or 0.0, norm_threshold=r or None, space="native",
                 formulation="diffusers")
    ref.momentum_buffer = MomentumBuffer(momentum) if momentum is not None else None
    for step in range(4):
        c, u = preds(10 + step)
        ref.set_state(step, 10, torch.tensor(900 - 100 * step))
        assert torch.allclose(rule.combine(c, u), ref.forward(c, u).pred, atol=1e-6, rtol=0), step


def test_apg_paper_form_is_diffusers_original_formulation_at_w_minus_one():
    w, eta, beta, r = 7.0, 0.0, -0.5, 3.0
    ref = AdaptiveProjectedGuidance(guidance_scale=w - 1, adaptive_projected_guidance_momentum=beta,
                                    adaptive_projected_guidance_rescale=r, eta=eta, use_original_formulation=True)
    ref.momentum_buffer = MomentumBuffer(beta)
    rule = G.APG(w, eta=eta, momentum=beta, norm_threshold=r, space="native", formulation="paper")
    for step in range(4):
        c, u = preds(20 + step)
        ref.set_state(step, 10, torch.tensor(900 - 100 * step))
        assert torch.allclose(rule.combine(c, u), ref.forward(c, u).pred, atol=1e-6, rtol=0)


def test_rules_are_odd_so_they_act_on_u_equals_minus_v():
    c, u = preds(3)
    for rule in (G.CFG(3.0), G.CFGZeroStar(3.0, zero_init_steps=0),
                 G.APG(3.0, momentum=0.0, norm_threshold=2.0, space="native")):
        assert torch.allclose(ours(rule, -c, -u, 5), -ours(rule, c, u, 5), atol=1e-6)


# ----------------------------------------------------------------------------------------------- GradkitGuider
def _run_guider(guider, steps=6, seed=0):
    outs, conds = [], []
    for step in range(steps):
        guider.set_state(step, steps, torch.tensor(1000.0 * (1 - step / steps)))
        batches = guider.prepare_inputs({"x": (torch.zeros(1), torch.ones(1))})
        conds.append(len(batches))
        c, u = preds(seed + step)
        outs.append(guider.forward(c, u if len(batches) == 2 else None).pred)
    return outs, conds


def test_gradkit_guider_matches_the_diffusers_guiders():
    for ours_rule, ref in ((G.CFG(4.0), ClassifierFreeGuidance(guidance_scale=4.0)),
                           (G.CFGZeroStar(4.0, zero_init_steps=1),
                            ClassifierFreeZeroStarGuidance(guidance_scale=4.0, zero_init_steps=1)),
                           (G.APG(4.0, eta=0.5, momentum=-0.5, norm_threshold=2.0, space="native",
                                  formulation="diffusers"),
                            AdaptiveProjectedGuidance(guidance_scale=4.0, adaptive_projected_guidance_momentum=-0.5,
                                                      adaptive_projected_guidance_rescale=2.0, eta=0.5))):
        a, ca = _run_guider(GradkitGuider(ours_rule))
        b, cb = _run_guider(ref)
        if isinstance(ours_rule, G.CFGZeroStar):  # gradkit skips the unconditional pass during zero-init
            assert ca[:1] == [1] and cb[:1] == [2]
            ca, cb = ca[1:], cb[1:]
        assert ca == cb
        for x, y in zip(a, b):
            assert torch.allclose(x, y, atol=1e-6, rtol=0)


def test_gradkit_guider_adaptive_switch_and_sigma_interval():
    # identical predictions: cos = 1 > γ̄ at step 0, so from step 1 on only the conditional prediction is requested
    guider = GradkitGuider(G.AdaptiveGuidance(3.0, threshold=0.99))
    conds = []
    for step in range(4):
        guider.set_state(step, 4, torch.tensor(1000.0 - 250 * step))
        conds.append(len(guider.prepare_inputs({"x": (torch.zeros(1), torch.ones(1))})))
        c = preds(step)[0]
        guider.forward(c, c if conds[-1] == 2 else None)
    assert conds == [2, 1, 1, 1]
    # EDM-σ interval: timestep = σ_flow·1000, t = 1 − σ_flow, σ_edm = (1 − t)/t
    guider = GradkitGuider(G.GuidanceInterval(G.CFG(3.0), start=0.5, stop=2.0, unit="sigma"))
    _, conds = _run_guider(guider, steps=10)
    ts = [step / 10 for step in range(10)]
    assert conds == [2 if 0.5 < ((1 - t) / t if t > 0 else float("inf")) <= 2.0 else 1 for t in ts]
    with pytest.raises(ValueError, match="native"):
        GradkitGuider(G.APG(3.0))
    with pytest.raises(ValueError, match="rule must be"):
        GradkitGuider(G.CFGPlusPlus(0.5))


# ------------------------------------------------------------------------------------ sampling diffusers models
def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16).eval()


def test_sample_reproduces_the_diffusers_flow_match_loop_with_cfg():
    from diffusers import FlowMatchEulerDiscreteScheduler

    net = tiny_sd3()
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    g = torch.Generator().manual_seed(1)
    cond = {"encoder_hidden_states": torch.randn(2, 5, 16, generator=g), "pooled_projections": torch.randn(2, 8,
                                                                                                           generator=g)}
    uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
    z0 = torch.randn(2, 4, 8, 8, generator=g)
    w = 4.0
    times = flow_times(sched, 6)
    # the SD3 pipeline's loop, re-typed: CFG on u, scheduler.step
    sched.set_timesteps(6)
    z = z0.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            ts = t.expand(2)
            u_c = net(z, encoder_hidden_states=cond["encoder_hidden_states"],
                      pooled_projections=cond["pooled_projections"], timestep=ts, return_dict=False)[0]
            u_u = net(z, encoder_hidden_states=uncond["encoder_hidden_states"],
                      pooled_projections=uncond["pooled_projections"], timestep=ts, return_dict=False)[0]
            z = sched.step(u_u + w * (u_c - u_u), t, z, return_dict=False)[0]
    out = G.sample(DiffusersFlowModel(net), z0, cond=cond, guidance=G.CFG(w, uncond=uncond), times=times,
                   full_output=True)
    assert torch.allclose(out.x, z, atol=1e-5), (out.x - z).abs().max()
    assert out.nfe == 12 and float(times[0]) == 0.0 and float(times[-1]) == 1.0


def test_sample_drives_a_unet_and_a_gradkit_only_method():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    model = DiffusersFlowModel(unet)
    z0 = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    times = torch.linspace(0, 1, 5, dtype=torch.float64)
    z = z0.clone()
    with torch.no_grad():
        for t0, t1 in zip(times[:-1], times[1:]):
            u = unet(z, timestep=torch.full((2,), (1 - float(t0)) * 1000.0), return_dict=False)[0]
            z = z + ((1 - float(t1)) - (1 - float(t0))) * u
    assert torch.allclose(G.sample(model, z0, times=times), z, atol=1e-6)
    # a reward-guided run through the same network (MPGD: no model gradient) stays finite and moves the samples
    guided = G.sample(model, z0, times=times, guidance=G.MPGD(lambda x: -x.pow(2).flatten(1).sum(1), 0.1))
    assert torch.isfinite(guided).all() and not torch.allclose(guided, z)


def test_missing_diffusers_names_the_extra():
    import subprocess
    import sys

    code = ("import sys\nsys.modules['diffusers'] = None\n"
            "try:\n    import gradkit.integrations.diffusers\nexcept ModuleNotFoundError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert 'gradkit[diffusers]' in out.stdout, out.stdout + out.stderr
