"""``train.freeze_encoder_epochs``: no gradient, no optimiser state and fixed BatchNorm statistics for the encoder
while frozen; trainable again after K epochs; the same after a resume (a function of the epoch)."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import pytest
import torch

from birefnet.config import ParamsError, load_params
from birefnet.models import build_model
from birefnet.training.checkpoint import load_training_state, save_training_state
from birefnet.training.criterion import build_criterion
from birefnet.training.engine import encoder_of, recalibrate_batchnorm, set_encoder_frozen, train_one_epoch
from birefnet.training.schedule import Schedule
from birefnet.training.trainer import ddp_options, make_optimizer

#: resnet10t: an encoder with BatchNorm layers, so their statistics can be checked; no decoder attention (speed).
MODEL = ["model.encoder=resnet10t", "model.attention=none", "model.drop_path_rate=0"]
STAGES = "train.stages=[{name: main, epochs: 2}, {name: ft, epochs: 1, loss: {bce: 0}}]"


def _params(repo_root: Path, freeze: str):  # noqa: ANN202
    return load_params(repo_root / "params.yaml", [*MODEL, STAGES, f"train.freeze_encoder_epochs={freeze}"])


def _batches(epoch: int, n: int = 1, size: int = 64) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + epoch)
    return [{"image": torch.randn(2, 3, size, size, generator=g),
             "mask": (torch.rand(2, 1, size, size, generator=g) > 0.8).float(),
             "gradient": torch.rand(2, 1, size, size, generator=g), "class_id": torch.full((2,), -1)}
            for _ in range(n)]


def _encoder_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Encoder weights and BatchNorm buffers (running statistics, batch counters)."""
    return {k: v.detach().clone() for k, v in encoder_of(model).state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _run(model, optimizer, params, epochs: range, modes: list[bool] | None = None) -> list[dict]:  # noqa: ANN001
    """The trainer's epoch loop without Ray: freeze state and seeds are functions of the epoch.

    ``modes`` collects the encoder's ``training`` flag at each of its forward calls inside the training epochs
    (one per step: params.yaml's ``model.multiscale_input`` is none).
    """
    schedule, criterion = Schedule(params.train), build_criterion()
    out = []
    for epoch in epochs:
        at = schedule.at(epoch)
        torch.manual_seed(7919 * (epoch + 1))
        set_encoder_frozen(model, at.encoder_frozen)
        if modes is not None:
            hook = encoder_of(model).register_forward_pre_hook(lambda m, _a: modes.append(m.training))
        recent: deque[torch.Tensor] = deque(maxlen=4)
        out.append(train_one_epoch(model, _batches(epoch), optimizer, criterion, device=torch.device("cpu"),
                                   weights=at.weights, supervise=at.stage.supervise, lr=at.lr, precision="fp32",
                                   grad_clip=1.0, recent=recent, freeze_encoder=at.encoder_frozen))
        if modes is not None:
            hook.remove()
        recalibrate_batchnorm(model, list(recent), device=torch.device("cpu"), precision="fp32",
                              exclude=[encoder_of(model)] if at.encoder_frozen else ())
    return out


def _fresh(params):  # noqa: ANN001, ANN202
    torch.manual_seed(0)
    model = build_model(params.model)
    return model, make_optimizer(model, params)  # over every parameter, as the trainer builds it before freezing


def test_frozen_encoder_gets_no_gradient_no_optimizer_state_and_keeps_weights_and_statistics(repo_root: Path) -> None:
    params = _params(repo_root, "all")
    model, optimizer = _fresh(params)
    encoder = encoder_of(model)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules())
    before, decoder_before = _encoder_state(model), model.decoder.final_head.weight.detach().clone()
    modes: list[bool] = []
    _run(model, optimizer, params, range(2), modes)
    assert modes == [False] * 2 and model.decoder.training  # the encoder ran in eval mode, the rest trained
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())
    encoder_ids = {id(p) for p in encoder.parameters()}
    assert not any(id(p) in encoder_ids for p in optimizer.state), "Adam state created for a frozen parameter"
    assert optimizer.state, "nothing was trained"
    assert _equal(before, _encoder_state(model)), "frozen weights or BatchNorm statistics changed"
    assert not torch.equal(decoder_before, model.decoder.final_head.weight)


def test_encoder_unfreezes_after_k_epochs(repo_root: Path) -> None:
    params = _params(repo_root, "1")
    schedule = Schedule(params.train)
    assert [schedule.at(e).encoder_frozen for e in range(3)] == [True, False, False]
    model, optimizer = _fresh(params)
    encoder = encoder_of(model)
    initial = _encoder_state(model)
    modes: list[bool] = []
    _run(model, optimizer, params, range(1), modes)
    after_frozen = _encoder_state(model)
    assert _equal(initial, after_frozen) and modes == [False]
    _run(model, optimizer, params, range(1, 2), modes)
    assert modes[1:] == [True]
    assert all(p.requires_grad and p.grad is not None for p in encoder.parameters())
    assert all("exp_avg" in optimizer.state[p] for p in encoder.parameters())
    # one optimiser step so far for the encoder, two for the rest
    assert {int(optimizer.state[p]["step"]) for p in encoder.parameters()} == {1}
    assert {int(optimizer.state[p]["step"]) for p in model.decoder.parameters()} == {2}
    now = _encoder_state(model)
    changed = [k for k in now if not torch.equal(now[k], after_frozen[k])]
    assert any(k.endswith("weight") for k in changed) and any(k.endswith("running_mean") for k in changed)


def test_resume_inside_the_frozen_epochs_keeps_the_freeze_and_continues_exactly(repo_root: Path,
                                                                              tmp_path: Path) -> None:
    params = _params(repo_root, "2")
    model, optimizer = _fresh(params)
    _run(model, optimizer, params, range(1))
    save_training_state(tmp_path, model=model, model_params=params.model, optimizer=optimizer, scaler=None,
                        state={"epoch": 0})
    at_checkpoint = _encoder_state(model)
    _run(model, optimizer, params, range(1, 3))
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(3)  # a new process: fresh weights and optimiser, every parameter trainable
    resumed = build_model(params.model)
    resumed_optimizer = make_optimizer(resumed, params)
    load_training_state(tmp_path, model=resumed, optimizer=resumed_optimizer, scaler=None)
    _run(resumed, resumed_optimizer, params, range(1, 2))
    assert _equal(at_checkpoint, _encoder_state(resumed)), "epoch 1 is frozen after the resume too"
    assert all(p.grad is None for p in encoder_of(resumed).parameters())
    _run(resumed, resumed_optimizer, params, range(2, 3))
    assert not _equal(at_checkpoint, _encoder_state(resumed))
    state = resumed.state_dict()
    assert all(torch.equal(reference[k], state[k]) for k in reference)


def test_freeze_encoding_is_validated(repo_root: Path) -> None:
    assert load_params(repo_root / "params.yaml").train.freeze_encoder_epochs == 0
    assert _params(repo_root, "all").train.freeze_encoder_epochs == "all"
    assert _params(repo_root, "3").train.freeze_encoder_epochs == 3
    for bad, message in (("-1", "'all' \\(the whole run\\), got -1"), ("whole", "expected one of 'all'"),
                         ("1.5", "freeze_encoder_epochs")):
        with pytest.raises(ParamsError, match=message):
            _params(repo_root, bad)
    schedule = Schedule(load_params(repo_root / "params.yaml").train)
    assert not any(schedule.at(e).encoder_frozen for e in range(schedule.total_epochs))
    assert all(Schedule(_params(repo_root, "all").train).at(e).encoder_frozen for e in range(3))


def test_ddp_keeps_a_temporarily_frozen_encoder_in_its_buckets() -> None:
    assert ddp_options(0, 0) == {} and ddp_options("all", 0) == {}
    assert ddp_options(2, 0) == ddp_options(2, 1) == {"find_unused_parameters": True}
    assert ddp_options(2, 2) == {}  # resumed after the unfreeze


def test_recalibration_leaves_excluded_batchnorm_alone() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1),
                              torch.nn.BatchNorm2d(2))
    images = list(torch.randn(4, 3, 8, 8) * 3 + 1)
    frozen = net[1].state_dict()
    frozen = {k: v.clone() for k, v in frozen.items()}
    assert recalibrate_batchnorm(net, images, device=torch.device("cpu"), precision="fp32", exclude=[net[1]]) == 1
    assert _equal(frozen, net[1].state_dict())
    assert not torch.equal(net[3].running_mean, torch.zeros(2))
