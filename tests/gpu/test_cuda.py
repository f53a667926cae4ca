"""What only a GPU can show: fp16 training with loss scaling, bf16, 8-bit AdamW on CUDA. Skipped without CUDA."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_fp16_overflow_is_skipped_by_the_loss_scaler(tiny_model_dir, small_dataset, tmp_path, monkeypatch):
    from helpers import train

    import hypernet
    from hypernet import training

    real_loss = training.diffusion_loss
    calls = []

    def overflowing_loss(model, scheduler, batch, snr_gamma=None):
        loss = real_loss(model, scheduler, batch, snr_gamma)
        calls.append(1)
        return loss * 1e30 if len(calls) == 3 else loss  # finite in float32, overflows fp16 gradients

    scales = []
    real_step = torch.amp.GradScaler.update

    def record_update(self, *a, **k):
        real_step(self, *a, **k)
        scales.append(self.get_scale())

    monkeypatch.setattr(training, "diffusion_loss", overflowing_loss)
    monkeypatch.setattr(torch.amp.GradScaler, "update", record_update)
    out = tmp_path / "fp16"
    assert (
        train(
            tiny_model_dir,
            small_dataset,
            out,
            "--mixed_precision",
            "fp16",
            "--hypernetwork_name",
            "x",
            "--save_every",
            2,
            steps=5,
        )
        == 0
    )
    assert len(scales) == 5 and scales[2] < scales[1], f"the scaler backed off at the overflowing step: {scales}"
    hn = hypernet.load(out / "x.pt")
    assert hn.config.step == 5 and all(torch.isfinite(p).all() for p in hn.parameters())
    assert all(p.dtype == torch.float32 for p in hn.parameters())


@pytest.mark.parametrize("flags", [["--mixed_precision", "bf16"], ["--mixed_precision", "fp16", "--use_8bit_adam"]])
def test_mixed_precision_training_on_cuda(tiny_model_dir, small_dataset, tmp_path, flags):
    from helpers import train

    import hypernet

    out = tmp_path / "run"
    assert (
        train(
            tiny_model_dir,
            small_dataset,
            out,
            *flags,
            "--gradient_checkpointing",
            "--hypernetwork_name",
            "x",
            "--learning_rate",
            "3e-3",
            steps=30,
        )
        == 0
    )
    rows = open(out / "loss.csv").read().split()[1:]
    losses = [float(r.split(",")[3]) for r in rows]
    assert sum(losses[-10:]) < sum(losses[:10])
    hn_file = hypernet.read(out / "x.pt", optimizer_state=True)
    assert hn_file.optimizer.name == ("AdamW8bit" if "--use_8bit_adam" in flags else "AdamW")
