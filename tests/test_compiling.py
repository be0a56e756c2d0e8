"""model.compile=true: compiled in place (the state dict keeps its keys), and uncompiled where it cannot build."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import compose_train
from fer.checkpoint import load_checkpoint
from fer.export import probability_model
from fer.models import compiling
from fer.models.classifier import FERClassifier
from fer.models.compiling import is_compiled
from fer.train import train

# timm's smallest EfficientNet: compiles in seconds where Lite0 takes minutes on 2 CPU cores.
TINY_NET = {"name": "test_efficientnet", "weights": "none", "drop_rate": 0.0}
# The fit's batch shape (TINY: batch 32) at 32 px, so the step test's compiled graph is the fit's too, from
# inductor's on-disk cache; splits in whole batches, so no smaller last batch compiles a dynamic-shape graph.
BATCH, SIZE = 32, 32
needs_compiler = pytest.mark.skipif(compiling.cannot_compile(torch.device("cpu")) is not None,
                                    reason="torch.compile needs a C++ compiler on CPU")


def tiny_model(**kwargs) -> FERClassifier:
    return FERClassifier(backbone=TINY_NET, scheduler={"name": "none"}, **kwargs)


@needs_compiler
def test_compiled_step_matches_eager_and_keeps_the_state_dict():
    torch.manual_seed(0)
    eager, compiled = tiny_model(), tiny_model(compile=True)
    compiled.load_state_dict(eager.state_dict())
    keys = list(compiled.state_dict())
    for model in (eager, compiled):
        model.configure_model()
        model.train()
    assert is_compiled(compiled.net) and not is_compiled(eager.net)
    assert list(compiled.state_dict()) == keys and not any("_orig_mod" in k for k in keys)
    assert not is_compiled(probability_model(compiled).net)  # exporters get the plain network

    images, labels = torch.rand(BATCH, 1, SIZE, SIZE), torch.arange(BATCH) % 7
    losses = []
    for model in (eager, compiled):
        loss = model._loss(model(images), labels)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    grads = [m.net.conv_stem.weight.grad for m in (eager, compiled)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-5)


def test_without_a_cxx_compiler_it_trains_uncompiled_with_one_warning(monkeypatch, caplog):
    from torch._inductor import cpp_builder

    def no_compiler():
        raise cpp_builder.exc.InvalidCxxCompiler

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    model = tiny_model(compile=True)
    with caplog.at_level(logging.WARNING, logger="fer.models.compiling"):
        model.configure_model()
    assert not is_compiled(model.net)
    (record,) = caplog.records
    assert "model.compile=true" in record.message and "C++ compiler" in record.message and "\n" not in record.message
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 7)  # the eager network still works


def test_gpu_kernels_need_no_cxx_check():
    assert compiling.cannot_compile(torch.device("cuda")) is None


@needs_compiler
def test_compiled_fit_writes_a_checkpoint_any_run_can_load_and_resume(tmp_path):
    backbone = [f"model.backbone.name={TINY_NET['name']}", "model.backbone.weights=none", f"data.image_size={SIZE}",
                f"data.batch_size={BATCH}", f"data.source.num_train={8 * BATCH}", f"data.source.num_val={2 * BATCH}"]
    cfg = compose_train(tmp_path / "compiled", [*backbone, "model.compile=true", "trainer.max_epochs=1"])
    summary = train(cfg)
    assert summary["epochs_completed"] == 1
    ckpt = torch.load(summary["last_model_path"], map_location="cpu", weights_only=True)
    assert "net.conv_stem.weight" in ckpt["state_dict"]
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])
    assert load_checkpoint(summary["last_model_path"]).model(torch.rand(1, 1, 32, 32)).shape == (1, 7)

    # Compiled runs from before in-place compiling saved net._orig_mod.* keys: they still load.
    wrapped = {k.replace("net.", "net._orig_mod.", 1): v for k, v in ckpt["state_dict"].items()}
    old_style = {**ckpt, "state_dict": wrapped}
    torch.save(old_style, tmp_path / "old_style.ckpt")
    loaded = load_checkpoint(tmp_path / "old_style.ckpt").model
    torch.testing.assert_close(loaded.net.conv_stem.weight, ckpt["state_dict"]["net.conv_stem.weight"])

    # The same run continued without compiling: the keys fit, so the resume is strict and finishes.
    last = summary["last_model_path"]
    resumed = compose_train(tmp_path / "eager", [*backbone, "trainer.max_epochs=2", f"ckpt_path={last}"])
    assert train(resumed)["epochs_completed"] == 2
