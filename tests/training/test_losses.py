"""Each loss against a value computed by hand on a small tensor."""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from sur_lightning.training.losses import DenoisingLoss, FeatureAlignmentLoss

STUDENT = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]]])  # [1, 2, 3]
TEACHER = torch.tensor([[[0.0, 1.0, 1.0], [2.0, 0.0, 1.0]]])


def softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_kl_equals_hand_computed_kl_student_to_teacher():
    expected = 0.0
    for s_row, t_row in zip(STUDENT[0].tolist(), TEACHER[0].tolist()):
        p, q = softmax(s_row), softmax(t_row)
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected /= 1  # batchmean over a batch of one
    loss = FeatureAlignmentLoss("kl", temperature=1.0)(STUDENT, TEACHER)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_kl_equals_the_official_formula_with_temperature():
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    tau = 2.0
    official = F.kl_div(F.log_softmax(teacher / tau, -1), F.softmax(student / tau, -1), reduction="batchmean") * tau**2
    assert FeatureAlignmentLoss("kl", temperature=tau)(student, teacher).item() == pytest.approx(
        official.item(), rel=1e-6
    )


def test_kl_gradient_flows_through_the_student_target_argument():
    student = STUDENT.clone().requires_grad_(True)
    FeatureAlignmentLoss("kl")(student, TEACHER).backward()
    assert student.grad.abs().sum() > 0


def test_pooled_teacher_is_broadcast_over_tokens():
    pooled = torch.tensor([[0.0, 1.0, 1.0]])
    broadcast = pooled[:, None, :].expand(1, 2, 3)
    for kind in ("kl", "cosine", "mse"):
        loss = FeatureAlignmentLoss(kind)
        assert loss(STUDENT, pooled).item() == pytest.approx(loss(STUDENT, broadcast).item())


def test_cosine_is_one_minus_cos_of_token_means():
    s_mean = [0.5, 1.0, 1.5]
    t_mean = [1.0, 0.5, 1.0]
    dot = sum(a * b for a, b in zip(s_mean, t_mean))
    cos = dot / (math.sqrt(sum(a * a for a in s_mean)) * math.sqrt(sum(b * b for b in t_mean)))
    assert FeatureAlignmentLoss("cosine")(STUDENT, TEACHER).item() == pytest.approx(1 - cos, rel=1e-6)


def test_mse_is_mean_squared_difference():
    diffs = [1, 1, -1, -2, 0, 2]
    expected = sum(d * d for d in diffs) / 6
    assert FeatureAlignmentLoss("mse")(STUDENT, TEACHER).item() == pytest.approx(expected)


def test_unknown_kind_is_rejected_by_name():
    with pytest.raises(ValueError, match="kind"):
        FeatureAlignmentLoss("l1")


def scheduler(prediction_type="epsilon"):
    return DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
    )


def test_denoising_plain_mse_and_targets():
    sched = scheduler()
    pred, target = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    assert DenoisingLoss()(pred, target, torch.tensor([10, 900]), sched).item() == pytest.approx(1.0)
    latents, noise, t = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([10, 900])
    assert torch.equal(DenoisingLoss.target(sched, latents, noise, t), noise)
    v_sched = scheduler("v_prediction")
    a = v_sched.alphas_cumprod[t].sqrt()[:, None, None, None]
    s = (1 - v_sched.alphas_cumprod[t]).sqrt()[:, None, None, None]
    assert torch.allclose(DenoisingLoss.target(v_sched, latents, noise, t), a * noise - s * latents, atol=1e-6)


def test_min_snr_weighting_by_hand():
    sched = scheduler()
    t = torch.tensor([10, 900])
    alpha_bar = sched.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    gamma = 5.0
    pred = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 2.0)])
    per_sample = torch.tensor([1.0, 4.0])
    expected = (per_sample * torch.clamp(snr, max=gamma) / snr).mean()
    loss = DenoisingLoss(snr_gamma=gamma)(pred, torch.zeros_like(pred), t, sched)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # The low-noise step (high SNR) is down-weighted; the high-noise one keeps weight 1.
    assert snr[0] > gamma > snr[1]


def test_noise_offset_shifts_channel_means():
    latents = torch.zeros(64, 4, 8, 8)
    plain = DenoisingLoss().sample_noise(latents, torch.Generator().manual_seed(0))
    offset = DenoisingLoss(noise_offset=1.0).sample_noise(latents, torch.Generator().manual_seed(0))
    plain_std = plain.mean(dim=(2, 3)).std()
    offset_std = offset.mean(dim=(2, 3)).std()
    assert offset_std > 5 * plain_std


def test_per_token_cosine_tells_apart_prompts_with_the_same_token_mean():
    from sur_lightning.training.losses import FeatureAlignmentLoss

    # Two "prompts" whose tokens are a permutation of each other: the same token mean, different tokens.
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    b = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    assert FeatureAlignmentLoss("cosine")(a, b).item() == pytest.approx(0.0, abs=1e-6)
    assert FeatureAlignmentLoss("cosine", pooling="tokens")(a, b).item() == pytest.approx(1.0)
    assert FeatureAlignmentLoss("cosine", pooling="tokens")(a, a).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="pooling must be one of"):
        FeatureAlignmentLoss("cosine", pooling="max")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_teacher_prediction_in_x0_space_is_the_mse_of_the_clean_latents_the_predictions_imply(prediction_type):
    from diffusers import DDPMScheduler

    from sur_lightning.training.losses import TeacherPredictionLoss

    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
    )
    torch.manual_seed(0)
    x_t, student, teacher = torch.randn(3, 4, 4, 8, 8).unbind(0)
    timesteps = torch.tensor([5, 300, 700, 999])
    alpha_bar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)

    def x0(prediction):
        if prediction_type == "epsilon":
            return (x_t - (1 - alpha_bar).sqrt() * prediction) / alpha_bar.sqrt()
        return alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * prediction

    expected = torch.nn.functional.mse_loss(x0(student), x0(teacher))
    got = TeacherPredictionLoss(space="x0")(student, teacher, timesteps, scheduler)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    # The plain form ignores the timestep: equal weight to every step.
    plain = TeacherPredictionLoss()(student, teacher, timesteps, scheduler)
    torch.testing.assert_close(plain, torch.nn.functional.mse_loss(student, teacher))
    with pytest.raises(ValueError, match="space must be one of"):
        TeacherPredictionLoss(space="latent")
