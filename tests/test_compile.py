"""Regional compilation with hypernetworks attached: no graph break in a compiled block, no recompilation across
what training and generation change between calls, and the compiled step's numbers equal the eager ones."""

import copy
import os

import numpy as np
import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from helpers import a1111_file, run_script, train
from PIL import Image
from test_train import read_csv
from torch._dynamo.testing import CompileCounter

import hypernet


@pytest.fixture
def frozen_unet(unet):
    unet = copy.deepcopy(unet)
    unet.requires_grad_(False)
    return unet


def inputs(side=8, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, side, side, generator=g),
        torch.tensor([10] * batch),
        torch.randn(batch, 77, 96, generator=g),
    )


def stack(kind):
    widths = [96, 40, 80, 160]
    made = {
        "linear": [hypernet.Hypernetwork(widths)],
        "relu": [hypernet.Hypernetwork(widths, activation_func="relu")],
        "layer norm": [hypernet.Hypernetwork(widths, activation_func="swish", add_layer_norm=True)],
        "dropout": [
            hypernet.Hypernetwork(widths, activation_func="relu", use_dropout=True, dropout_structure=[0, 0.3, 0])
        ],
        "stacked": [hypernet.Hypernetwork(widths), hypernet.Hypernetwork(widths, activation_func="relu")],
        "two linear": [hypernet.Hypernetwork(widths), hypernet.Hypernetwork(widths, layer_structure=[1, 3, 1])],
    }[kind]
    for hn in made:
        for p in hn.parameters():
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    return made


def train_steps(unet, hypernetworks, steps, shapes=(8,)):
    optimizer = torch.optim.AdamW([p for hn in hypernetworks for p in hn.parameters()], lr=1e-3)
    for step in range(steps):
        sample, timesteps, text = inputs(shapes[step % len(shapes)], seed=step)
        loss = unet(sample, timesteps, text).sample.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("kind", ["linear", "relu", "layer norm", "dropout", "stacked"])
def test_a_compiled_block_has_no_graph_break_and_training_compiles_once(frozen_unet, kind):
    torch._dynamo.reset()
    hypernetworks = stack(kind)
    hypernet.attach(frozen_unet, hypernetworks)
    counter = CompileCounter()
    hypernet.compile_blocks(frozen_unet, fullgraph=True, backend=counter)  # a graph break is an error
    train_steps(frozen_unet, hypernetworks, 1)
    compiled = counter.frame_count
    assert compiled > 0
    train_steps(frozen_unet, hypernetworks, 3)  # optimizer steps change every weight
    for hn in hypernetworks:
        hn.set_multiplier(0.5)  # (training runs at multiplier 1, as the webui's)
    train_steps(frozen_unet, hypernetworks, 1)
    assert counter.frame_count == compiled, "recompiled across training steps"


@pytest.mark.parametrize("kind", ["two linear", "stacked"])
def test_generation_compiles_once_across_multipliers_and_merging(frozen_unet, kind):
    """Two linear hypernetworks run merged into to_k/to_v; with a relu one in the stack they run as modules."""
    torch._dynamo.reset()
    hypernetworks = stack(kind)
    for hn in hypernetworks:
        hn.eval().requires_grad_(False)
    sample, timesteps, text = inputs()
    with torch.no_grad():
        plain = frozen_unet(sample, timesteps, text).sample
    attachment = hypernet.attach(frozen_unet, hypernetworks, merge=True)
    counter = CompileCounter()
    hypernet.compile_blocks(frozen_unet, fullgraph=True, backend=counter)
    with torch.no_grad():
        frozen_unet(sample, timesteps, text)
        compiled = counter.frame_count
        merged = [p for _, _, p in attachment.projections if p.merged_weight is not None]
        assert len(merged) == (len(attachment.projections) if kind == "two linear" else 0)
        results = {}
        for multiplier in (1.0, 0.3, 0.0, 1.0):
            for hn in hypernetworks:
                hn.set_multiplier(multiplier)
            attachment.merge()  # into the same tensors
            results[multiplier] = frozen_unet(sample, timesteps, text).sample
        assert counter.frame_count == compiled, "recompiled for a multiplier"
        attachment.unmerge()
        unmerged = frozen_unet(sample, timesteps, text).sample
        after_unmerge = counter.frame_count
        attachment.merge()
        remerged = frozen_unet(sample, timesteps, text).sample
        attachment.unmerge()
        frozen_unet(sample, timesteps, text)
        # Merged and unmerged are two computations, each compiled once: going back and forth compiles nothing.
        assert counter.frame_count == after_unmerge <= 2 * compiled
    # The merged compiled blocks apply the multipliers they are given: 0 is the plain UNet, 1 the unmerged stack.
    torch.testing.assert_close(results[0.0], plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1.0], unmerged, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(remerged, unmerged, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(results[0.3], plain, atol=1e-4)


def test_attach_works_on_a_compiled_unet_and_detach_restores_it(frozen_unet):
    torch._dynamo.reset()
    sample, timesteps, text = inputs()
    hypernetworks = stack("relu")
    eager = copy.deepcopy(frozen_unet)
    with torch.no_grad(), hypernet.attach(eager, copy.deepcopy(hypernetworks)):
        want = eager(sample, timesteps, text).sample
    counter = CompileCounter()
    hypernet.compile_blocks(frozen_unet, fullgraph=True, backend=counter)
    with torch.no_grad():
        plain = frozen_unet(sample, timesteps, text).sample
        with hypernet.attach(frozen_unet, hypernetworks) as attachment:
            assert attachment.compiled
            got = frozen_unet(sample, timesteps, text).sample
        again = frozen_unet(sample, timesteps, text).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, plain, rtol=0, atol=0)
    assert not torch.allclose(got, plain, atol=1e-4)


def test_at_most_one_compilation_per_bucket_shape(frozen_unet):
    torch._dynamo.reset()
    hypernetworks = stack("relu")
    hypernet.attach(frozen_unet, hypernetworks)
    counter = CompileCounter()
    hypernet.compile_blocks(frozen_unet, fullgraph=True, backend=counter)
    train_steps(frozen_unet, hypernetworks, 1, shapes=(8,))
    one_shape = counter.frame_count
    train_steps(frozen_unet, hypernetworks, 6, shapes=(8, 12, 16))  # --varsize batches of three sizes
    assert counter.frame_count <= 3 * one_shape


def test_compiled_loss_and_gradients_equal_the_eager_ones(frozen_unet):
    """With inductor, the code a user's --torch_compile runs."""
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        unet, hypernetworks = copy.deepcopy(frozen_unet), stack("layer norm")
        hypernet.attach(unet, hypernetworks)
        if compiled:
            hypernet.compile_blocks(unet, fullgraph=True)
        sample, timesteps, text = inputs()
        loss = F.mse_loss(unet(sample, timesteps, text).sample, torch.zeros_like(sample))
        loss.backward()
        results.append((loss.detach(), [p.grad for hn in hypernetworks for p in hn.parameters()]))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    scale = max(g.abs().max() for g in eager_grads)
    for eager, compiled in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-4 * scale)


def test_compile_blocks_refuses_an_unknown_mode(frozen_unet):
    with pytest.raises(hypernet.UsageError, match=r"torch.compile mode 'fast': use one of default, reduce-overhead"):
        hypernet.compile_blocks(frozen_unet, mode="fast")


@pytest.fixture
def counted_compile(monkeypatch):
    """--torch_compile with dynamo's counting backend: the scripts compile as users' do, without inductor's code
    generation (its numbers are checked above), and the test reads how many graphs were compiled."""
    counter = CompileCounter()
    real = hypernet.attachment.compile_blocks

    def compile_blocks(unet, mode="default", fullgraph=False, backend="inductor"):
        return real(unet, mode, fullgraph=True, backend=counter)

    monkeypatch.setattr(hypernet.attachment, "compile_blocks", compile_blocks)
    torch._dynamo.reset()
    return counter


def test_training_with_torch_compile_gives_the_eager_losses_and_compiles_once(
    tiny_model_dir, small_dataset, tmp_path, counted_compile
):
    assert train(tiny_model_dir, small_dataset, tmp_path / "eager", steps=4) == 0
    assert train(tiny_model_dir, small_dataset, tmp_path / "one", "--torch_compile", steps=1) == 0
    after_one = counted_compile.frame_count
    torch._dynamo.reset()
    counted_compile.clear()
    assert train(tiny_model_dir, small_dataset, tmp_path / "four", "--torch_compile", steps=4) == 0
    assert counted_compile.frame_count == after_one > 0, "steps 2 to 4 compiled again"
    eager = [float(r["loss"]) for r in read_csv(tmp_path / "eager" / "loss.csv")]
    compiled = [float(r["loss"]) for r in read_csv(tmp_path / "four" / "loss.csv")]
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_generate_with_torch_compile_makes_the_eager_images(tiny_model_dir, tmp_path, counted_compile):
    case1 = a1111_file("case1_default_relu")
    argv = [
        "--pretrained_model_name_or_path",
        tiny_model_dir,
        "--prompt",
        "a cat",
        "--prompt",
        "a dog",
        "--hypernetwork",
        f"{case1}:0.7",
        "--num_inference_steps",
        3,
        "--no_progress",
        "--no_grid",
    ]
    assert run_script("generate.py", *argv, "--output_dir", tmp_path / "eager") == 0
    assert run_script("generate.py", *argv, "--output_dir", tmp_path / "compiled", "--torch_compile") == 0
    assert 0 < counted_compile.frame_count
    for name in sorted(os.listdir(tmp_path / "eager")):
        eager = np.asarray(Image.open(tmp_path / "eager" / name), dtype=np.int16)
        compiled = np.asarray(Image.open(tmp_path / "compiled" / name), dtype=np.int16)
        assert np.abs(eager - compiled).max() <= 1, name
