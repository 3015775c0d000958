"""convgap.train: exact resume, distillation, schedules, checkpoints, bad input, and the same
weights from two processes (torchrun, one node or two) as from one."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from convgap import ConvgapError, train
from convgap.cache import write_atomic
from convgap.train.optim import make_optimizer, make_schedule, param_groups
from training import RUN, Augmented, tiny_data, tiny_net

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


class Interrupt(Exception):
    """Stands for a run killed in the middle of an epoch."""


def _same_state(a: nn.Module, b: nn.Module) -> list[str]:
    """Names of the state entries that are not bitwise equal."""
    sb = b.state_dict()
    return [k for k, v in a.state_dict().items() if not torch.equal(v, sb[k])]


def _rows(history: train.History) -> list[tuple]:
    """The history without its timings."""
    return [(r.epoch, r.train_loss, r.train_top1, r.val_loss, r.val_top1, r.lr)
            for r in history.epochs]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_an_interrupted_run_resumed_ends_bitwise_equal(tmp_path, optimizer):
    data, val = Augmented(tiny_data()), tiny_data(32, seed=2)
    kw = dict(epochs=3, batch_size=16, lr=0.05, optimizer=optimizer, warmup=0.5,
              device="cpu", quiet=True, seed=3)
    whole = tiny_net(batchnorm=True, dropout=0.3)
    expect = train.fit(whole, data, val, checkpoint=tmp_path / "a.pt", **kw)

    def killer(model, inputs, outputs, step):
        if step == 4 + 2:  # in the middle of the second epoch (4 steps per epoch)
            raise Interrupt
        return outputs.new_zeros(())

    ckpt = tmp_path / "b.pt"
    with pytest.raises(Interrupt):
        train.fit(tiny_net(batchnorm=True, dropout=0.3), data, val, checkpoint=ckpt,
                  extra_loss=killer, **kw)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    torch.manual_seed(123)  # the resumed run must not depend on the caller's generators
    resumed = tiny_net(batchnorm=True, dropout=0.3, seed=7)  # other initial weights
    got = train.fit(resumed, data, val, checkpoint=ckpt, **kw)
    assert _same_state(whole, resumed) == []
    assert _rows(got) == _rows(expect) and len(got.epochs) == 3
    # the weights moved, so the comparison above is not between two untouched models
    assert _same_state(whole, tiny_net(batchnorm=True, dropout=0.3)) != []


def test_resuming_a_finished_run_trains_nothing(tmp_path):
    kw = dict(epochs=2, checkpoint=tmp_path / "c.pt", **{k: v for k, v in RUN.items()
                                                          if k != "epochs"})
    net = tiny_net()
    first = train.fit(net, tiny_data(), tiny_data(seed=2), **kw)
    again = tiny_net(seed=5)
    second = train.fit(again, tiny_data(), tiny_data(seed=2), **kw)
    assert _same_state(net, again) == [] and second.epochs == first.epochs


def test_a_checkpoint_of_another_architecture_loads_nothing(tmp_path):
    ckpt = tmp_path / "c.pt"
    train.fit(tiny_net(), tiny_data(), tiny_data(seed=2), checkpoint=ckpt, **RUN)
    other = tiny_net(classes=5)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ConvgapError, match="do not fit.*shape mismatch.*same architecture"):
        train.fit(other, tiny_data(classes=5), tiny_data(classes=5, seed=2),
                  checkpoint=ckpt, **RUN)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    with pytest.raises(ConvgapError, match="optimizer 'sgd' and seed 0"):
        train.fit(tiny_net(), tiny_data(), tiny_data(seed=2), checkpoint=ckpt,
                  optimizer="adamw", **RUN)
    weights = tmp_path / "w.pt"
    torch.save(tiny_net().state_dict(), weights)
    with pytest.raises(ConvgapError, match="not a convgap training checkpoint"):
        train.fit(tiny_net(), tiny_data(), tiny_data(seed=2), checkpoint=weights, **RUN)


def test_the_checkpoint_holds_only_safe_types_and_the_log_one_record_per_epoch(tmp_path):
    net = tiny_net()
    history = train.fit(net, tiny_data(), tiny_data(seed=2), checkpoint=tmp_path / "c.pt",
                        log=tmp_path / "log.json", **RUN)
    saved = torch.load(tmp_path / "c.pt", weights_only=True)  # no pickled objects
    assert saved["epoch"] == 2 and saved["step"] == 8
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in saved["model"].items())
    log = json.loads((tmp_path / "log.json").read_text())
    assert log == history.to_dict() and [r["epoch"] for r in log["epochs"]] == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "log.json"]  # no temp files


def test_an_atomic_write_that_fails_leaves_the_old_file(tmp_path):
    path = write_atomic(tmp_path / "f.bin", lambda fh: fh.write(b"old"))

    def broken(fh):
        fh.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, broken)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_distillation_loss_is_the_documented_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 7, generator=g), torch.randn(6, 7, generator=g)
    y = torch.randint(0, 7, (6,), generator=g)
    alpha, temp = 0.3, 2.5
    p_t = F.softmax(t.double() / temp, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s.double() / temp, -1))).sum(-1).mean()
    expect = (1 - alpha) * F.cross_entropy(s.double(), y) + alpha * temp ** 2 * kl
    got = train.distillation_loss(s, t, y, alpha, temp)
    assert torch.allclose(got.double(), expect, rtol=1e-5)
    assert torch.allclose(train.distillation_loss(s, t, y, 0.0, temp), F.cross_entropy(s, y))
    with pytest.raises(ConvgapError, match="teacher gives 5 class scores.*student 7"):
        train.distillation_loss(s, t[:, :5], y, alpha, temp)


def test_distillation_pulls_the_student_to_a_frozen_teacher():
    teacher = tiny_net(seed=9)
    teacher.train()
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    data = tiny_data()
    x = torch.stack([data[i][0] for i in range(len(data))])

    def gap(net):
        with torch.no_grad():
            return F.kl_div(F.log_softmax(net(x), -1), F.log_softmax(teacher(x), -1),
                            reduction="batchmean", log_target=True).item()

    plain, taught = tiny_net(), tiny_net()
    kw = dict(RUN, epochs=4, lr=0.2)
    train.fit(plain, data, data, **kw)
    train.fit(taught, data, data, teacher=teacher, kd_alpha=1.0, kd_temperature=1.0, **kw)
    assert not teacher.training and all(
        torch.equal(v, frozen[k]) for k, v in teacher.state_dict().items())
    assert gap(taught) < 0.5 * gap(plain)


def test_a_teacher_of_other_classes_fails_before_anything_is_written(tmp_path):
    with pytest.raises(ConvgapError, match="teacher gives 5 class scores.*student 4"):
        train.fit(tiny_net(), tiny_data(), tiny_data(seed=2), teacher=tiny_net(classes=5),
                  checkpoint=tmp_path / "out" / "c.pt", log=tmp_path / "out" / "log.json",
                  **RUN)
    assert not (tmp_path / "out").exists()


def test_labels_beyond_the_model_classes_are_an_error():
    data = tiny_data(classes=6)
    with pytest.raises(ConvgapError, match="label 5 is outside the model's 4 classes"):
        train.fit(tiny_net(), data, data, **RUN)
    with pytest.raises(ConvgapError, match="outside the model's 4 classes"):
        train.evaluate(tiny_net(), data)


def test_an_unwritable_checkpoint_path_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    calls = []
    with pytest.raises(ConvgapError, match="is a file, not a folder"):
        train.fit(tiny_net(), tiny_data(), tiny_data(), checkpoint=tmp_path / "file" / "c.pt",
                  extra_loss=lambda *a: calls.append(a) or torch.zeros(()), **RUN)
    assert calls == []
    with pytest.raises(ConvgapError, match="is a folder"):
        train.fit(tiny_net(), tiny_data(), tiny_data(), log=tmp_path, **RUN)


def test_extra_loss_sees_the_model_and_each_step():
    steps, models = [], set()
    lam = 1.0

    def l2(model, inputs, outputs, step):
        steps.append(step)
        models.add(id(model))
        assert inputs.shape == (16, 3, 8, 8) and outputs.shape == (16, 4)
        return lam * sum((p ** 2).sum() for p in model.parameters())

    plain, shrunk = tiny_net(), tiny_net()
    train.fit(plain, tiny_data(), tiny_data(seed=2), **RUN)
    train.fit(shrunk, tiny_data(), tiny_data(seed=2), extra_loss=l2, **RUN)
    assert steps == list(range(8)) and models == {id(shrunk)}
    norm = lambda m: sum((p ** 2).sum() for p in m.parameters()).item()  # noqa: E731
    assert norm(shrunk) < 0.8 * norm(plain)


def test_evaluate_counts_top1_and_top5():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(50, 8, generator=g)
    labels = torch.randint(0, 8, (50,), generator=g)
    got = train.evaluate(nn.Identity(), torch.utils.data.TensorDataset(scores, labels), batch_size=7)
    rank = (scores > scores.gather(1, labels[:, None])).sum(1)  # better scores than the label
    assert got.images == 50
    assert got.top1 == pytest.approx((rank == 0).float().mean().item())
    assert got.top5 == pytest.approx((rank < 5).float().mean().item())
    assert got.loss == pytest.approx(F.cross_entropy(scores, labels).item(), rel=1e-6)
    assert 0 < got.top1 < got.top5 < 1


def test_the_schedule_warms_up_linearly_then_follows_the_cosine():
    p = nn.Parameter(torch.zeros(1))
    opt = make_optimizer("sgd", [p], 0.4, None, 0.9)
    sched = make_schedule(opt, "cosine", total_steps=20, warmup_steps=4)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    warm = [0.4 * (1 / 5 + (1 - 1 / 5) * s / 4) for s in range(4)]
    cos = [0.2 * (1 + math.cos(math.pi * s / 16)) for s in range(16)]
    assert lrs == pytest.approx(warm + cos, abs=1e-9)
    opt = make_optimizer("adamw", [p], 0.4, None, 0.9)
    sched = make_schedule(opt, "constant", total_steps=5, warmup_steps=0)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.4 and opt.param_groups[0]["weight_decay"] == 1e-2
    with pytest.raises(ConvgapError, match="warm-up"):
        make_schedule(opt, "cosine", total_steps=5, warmup_steps=5)
    with pytest.raises(ConvgapError, match="unknown optimizer"):
        make_optimizer("lion", [p], 0.1, None, 0.9)


def test_a_module_lr_scale_sets_its_parameters_learning_rate():
    """Parameters under a module with ``lr_scale`` (the nearest one above) train at that
    multiple of the rate, through the schedule; the others at the rate."""
    class Fast(nn.Linear):
        lr_scale = 10.0

    class Slow(nn.Sequential):
        lr_scale = 0.5

    model = nn.Sequential(nn.Linear(2, 2), Slow(nn.Linear(2, 2), Fast(2, 2)))
    groups = param_groups(model, 0.1)
    by_lr = {round(g["lr"], 9): {id(p) for p in g["params"]} for g in groups}
    assert by_lr == {0.05: {id(p) for p in model[1][0].parameters()},
                     0.1: {id(p) for p in model[0].parameters()},
                     1.0: {id(p) for p in model[1][1].parameters()}}
    opt = make_optimizer("sgd", groups, 0.1, None, 0.9)
    sched = make_schedule(opt, "cosine", total_steps=4, warmup_steps=0)
    opt.step()
    sched.step()
    ratios = sorted(g["lr"] / 0.1 / (1 + math.cos(math.pi / 4)) * 2 for g in opt.param_groups)
    assert ratios == pytest.approx([0.5, 1.0, 10.0])
    Fast.lr_scale = 0.0
    with pytest.raises(ConvgapError, match="lr_scale must be positive"):
        param_groups(model, 0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args, str(TESTS / "training.py")]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(TESTS), env.get("PYTHONPATH", "")])
    return env


def _single_process() -> tuple[nn.Module, train.History]:
    net = tiny_net()
    return net, train.fit(net, tiny_data(), tiny_data(seed=2), **RUN)


def _agrees(out: Path, net: nn.Module, history: train.History) -> None:
    """The multi-process run in ``out`` ended with ``net``'s weights and history."""
    got = torch.load(out / "weights.pt", weights_only=True)
    for k, v in net.state_dict().items():
        assert torch.allclose(got[k], v, atol=1e-5, rtol=0), k
    assert not all(torch.equal(got[k], v) for k, v in tiny_net().state_dict().items())
    rows = json.loads((out / "history.json").read_text())["epochs"]
    for row, ref in zip(rows, history.epochs, strict=True):
        assert row["val_top1"] == ref.val_top1
        assert row["train_loss"] == pytest.approx(ref.train_loss, abs=1e-5)
        assert row["val_loss"] == pytest.approx(ref.val_loss, abs=1e-5)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert len(saved["rng"]) == 2 and saved["epoch"] == RUN["epochs"]
    assert json.loads((out / "log.json").read_text())["epochs"] == rows


def test_two_processes_train_the_same_weights_as_one(tmp_path):
    proc = subprocess.run(
        _torchrun("--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                  "--master_port", str(_free_port())) + [str(tmp_path)],
        env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _agrees(tmp_path, *_single_process())


def test_two_nodes_through_a_loopback_rendezvous_agree_too(tmp_path):
    port = _free_port()
    nodes = [subprocess.Popen(
        _torchrun("--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
                  "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                  "--rdzv_id", "convgap-test", "--rdzv_conf", f"is_host={int(rank == 0)}",
                  "--local_addr", "127.0.0.1") + [str(tmp_path)],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    _agrees(tmp_path, *_single_process())
