"""The training maths against its formulas: targets, min-SNR weights, noise offset, the loss, the webui's schedules."""

import pytest
import torch
from diffusers import DDPMScheduler

from hypernet import training
from hypernet.errors import ArgumentError, UsageError


def scheduler(prediction_type):
    return DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)


def alphas(noise_scheduler, timesteps):
    return noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)


def test_targets_are_the_noise_or_the_velocity():
    torch.manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([1, 500, 999])
    eps = scheduler("epsilon")
    assert torch.equal(training.diffusion_target(eps, latents, noise, timesteps), noise)
    v = scheduler("v_prediction")
    a = alphas(v, timesteps)
    velocity = a.sqrt() * noise - (1 - a).sqrt() * latents  # v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x0
    assert torch.allclose(training.diffusion_target(v, latents, noise, timesteps), velocity, atol=1e-6)
    with pytest.raises(UsageError, match="predicts 'sample'; hypernet trains epsilon or v_prediction"):
        training.diffusion_target(scheduler("sample"), latents, noise, timesteps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights(prediction_type):
    noise_scheduler = scheduler(prediction_type)
    timesteps = torch.tensor([0, 10, 200, 600, 999])
    a = noise_scheduler.alphas_cumprod[timesteps]
    snr = a / (1 - a)
    clipped = torch.minimum(snr, torch.tensor(5.0))
    want = clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
    got = training.snr_weights(noise_scheduler, timesteps, 5.0)
    assert torch.allclose(got, want, rtol=1e-5)
    assert got[-1] == pytest.approx(1.0 if prediction_type == "epsilon" else float(snr[-1] / (snr[-1] + 1)), rel=1e-4)
    assert got[0] < 1, "low-noise steps, whose SNR is far above gamma, are weighted down"


def test_noise_offset_shifts_each_channel_by_a_constant():
    plain = training.sample_noise((4, 8, 8), torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    shifted = training.sample_noise((4, 8, 8), generator, noise_offset=0.1)
    after_noise = torch.Generator().manual_seed(3)
    torch.randn((4, 8, 8), generator=after_noise)
    offsets = 0.1 * torch.randn((4, 1, 1), generator=after_noise)
    assert torch.allclose(shifted - plain, offsets.expand(4, 8, 8), atol=1e-6)


class Constant(torch.nn.Module):
    """A 'UNet' that predicts the same tensor whatever it is given."""

    def __init__(self, prediction):
        super().__init__()
        self.prediction = prediction

    def forward(self, noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=None):
        return self.prediction


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_is_the_weighted_mse_against_the_target(prediction_type):
    torch.manual_seed(1)
    noise_scheduler = scheduler(prediction_type)
    batch = {
        "latents": torch.randn(2, 4, 8, 8),
        "noise": torch.randn(2, 4, 8, 8),
        "timesteps": torch.tensor([50, 900]),
        "encoder_hidden_states": torch.randn(2, 77, 16),
        "weight": torch.rand(2, 4, 8, 8),
    }
    prediction = torch.randn(2, 4, 8, 8)
    target = training.diffusion_target(noise_scheduler, batch["latents"], batch["noise"], batch["timesteps"])
    per_sample = ((prediction - target) ** 2 * batch["weight"]).mean(dim=(1, 2, 3))
    got = training.diffusion_loss(Constant(prediction), noise_scheduler, batch)
    assert got.item() == pytest.approx(per_sample.mean().item(), rel=1e-6)
    weights = training.snr_weights(noise_scheduler, batch["timesteps"], 5.0)
    got = training.diffusion_loss(Constant(prediction), noise_scheduler, batch, snr_gamma=5.0)
    assert got.item() == pytest.approx((per_sample * weights).mean().item(), rel=1e-6)


def test_webui_schedules():
    schedule = training.parse_schedule("5e-5:100, 5e-6:1500, 5e-7", "--learning_rate")
    assert [training.rate_at(schedule, s) for s in (0, 99, 100, 1499, 1500, 99999)] == [
        5e-5,
        5e-5,
        5e-6,
        5e-6,
        5e-7,
        5e-7,
    ]
    assert training.parse_schedule("0.1", "--clip_grad_value") == [(0.1, None)]
    for text, message in [
        ("1e-3:-5, 1e-5", "the step after ':' must be 1 or more"),
        ("-1e-3", "not a finite, non-negative number"),
        ("nan", "not a finite, non-negative number"),
        ("1e-3:100, 1e-4:50, 1e-5", "the steps must rise"),
        ("1e-3, 1e-4:50", "the steps must rise, and only the last rate may have none"),
        ("1e-3:2.5", "expected a number or a schedule"),
    ]:
        with pytest.raises(UsageError, match=message):
            training.parse_schedule(text, "--learning_rate")


def test_optimizers_the_loop_cannot_drive_are_refused():
    assert training.optimizer_class("SGD") == (torch.optim.SGD, "SGD")
    for name, why in [("LBFGS", "needs a closure"), ("SparseAdam", "sparse gradients"), ("Optimizer", "base class")]:
        with pytest.raises(ArgumentError, match=f"^name {name}: not supported .*{why}"):
            training.optimizer_class(name)
    with pytest.raises(ArgumentError, match="^name 'Adamish': not a torch.optim class") as raised:
        training.optimizer_class("Adamish")
    assert str(raised.value.about("--optimizer")).startswith("--optimizer 'Adamish': not a torch.optim class")
    optimizer, name = training.make_optimizer([torch.nn.Parameter(torch.zeros(3))], "Adam", betas=(0.8, 0.9))
    assert name == "Adam" and optimizer.param_groups[0]["betas"] == (0.8, 0.9) and optimizer.param_groups[0]["lr"] == 1


@pytest.mark.parametrize("name", ["AdamW", "Adam", "RAdam", "NAdam", "Adamax", "SGD", "Adagrad", "RMSprop"])
def test_optimizers_get_torchs_defaults_as_the_webui_creates_them(name):
    parameters = [torch.nn.Parameter(torch.zeros(3))]
    optimizer, _ = training.make_optimizer(parameters, name)
    own = getattr(torch.optim, name)([torch.nn.Parameter(torch.zeros(3))], lr=1.0)
    assert training.optimizer_settings(optimizer) == training.optimizer_settings(own)
    expected_decay = 1e-2 if name == "AdamW" else 0
    assert optimizer.defaults["weight_decay"] == expected_decay, "AdamW's own 0.01; every other class's own 0"
    given, _ = training.make_optimizer(parameters, name, weight_decay=0.5)
    assert given.defaults["weight_decay"] == 0.5, "a setting given overrides the class's default"


def test_a_schedule_ends_where_its_last_step_is_and_minus_one_means_to_the_end():
    assert training.parse_schedule("1e-3:10", "lr") == [(1e-3, 10)]
    assert training.schedule_end(training.parse_schedule("5e-3:10, 1e-3:20", "lr")) == 20
    assert training.parse_schedule("1e-3:5, 1e-4:-1", "lr") == [(1e-3, 5), (1e-4, None)]
    assert training.schedule_end(training.parse_schedule("1e-3:5, 1e-4:-1", "lr")) is None
    with pytest.raises(UsageError, match=r"\(or -1, until the end, on the last rate\), not -1"):
        training.parse_schedule("1e-3:-1, 1e-4", "lr")
