"""Converted checkpoints load into Megatron-core models split across processes (tensor / expert parallel), with
Megatron's own sharded loader, and give the reference model's logits: two gloo processes on CPU via torchrun."""

import re
from pathlib import Path

import pytest
import torch

from nemo_upcycle.checkpoint import WriteOptions
from nemo_upcycle.convert import convert
from nemo_upcycle.recipe import UpcycleConfig
from tests.conftest import random_model, small_config, torchrun
from tests.nemo_fixtures import write_nemo_dir

ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize("fmt, parallel", [("nemo", "--tp"), ("nemo", "--ep"), ("megatron", "--tp")])
def test_converted_checkpoint_loads_at_tp2_and_ep2(megatron, tmp_path, fmt, parallel):
    dense = write_nemo_dir(tmp_path / "dense", random_model(small_config()), spm=None)
    out = tmp_path / "moe"
    convert(dense, out, UpcycleConfig.from_shorthand("E4G2T2"), write=WriteOptions(fmt, pack=False), progress=False)
    target = out if fmt == "nemo" else out / "iter_0000000"
    proc = torchrun([str(ROOT / "scripts" / "parallel_load_check.py"), str(target), parallel, "2"], timeout=300)
    ranks = re.findall(r"rank (\d): TP=\d EP=\d max abs logit diff vs reference ([0-9.e+-]+)", proc.stdout)
    assert proc.returncode == 0 and sorted(r for r, _ in ranks) == ["0", "1"], proc.stdout[-2000:] + proc.stderr[-3000:]
    assert max(float(d) for _, d in ranks) < 1e-4


# ---- Megatron-core's training engine on each parallel layout vs one process (scripts/parallel_train_check.py) ----
CHECK = ROOT / "scripts" / "parallel_train_check.py"


@pytest.fixture(scope="module")
def engine_reference(tmp_path_factory):
    """One process: the seeded starting weights and the weights after two Adam steps through the engine."""
    import os
    import subprocess
    import sys

    work = tmp_path_factory.mktemp("engine")
    launcher = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # this session's own group
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    proc = subprocess.run([sys.executable, str(CHECK), str(work), "--reference"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work


def _layouts(work: Path, layouts: list[str], nproc: int) -> dict[str, tuple[float, float]]:
    proc = torchrun([str(CHECK), str(work), *layouts], nproc=nproc, timeout=600)
    found = {m[0]: (float(m[1]), float(m[2])) for m in
             re.findall(r"layout (\S+): max abs diff ([0-9.e+-]+) moved ([0-9.e+-]+)", proc.stdout)}
    assert proc.returncode == 0 and sorted(found) == sorted(layouts), proc.stdout[-2000:] + proc.stderr[-3000:]
    return found


def test_engine_on_two_processes_equals_one_process(engine_reference):
    """TP=2 (sequence parallel), PP=2 (1F1B), PP=2 x VPP=2 (interleaved 1F1B), EP=2, DP=2, the
    distributed optimizer with overlapped bucketed reduce, and resumes from a sharded model + Adam checkpoint
    at another TP/PP/VPP layout, with and without the distributed optimizer (torch's Adam on CPU: the resume
    ends 4.7e-3 away if Megatron's shared `step` tensor is left in place): every result equals the one-process
    run's weights. Expert gradients reduced over
    the data-parallel group instead of the expert-data-parallel one (the old flat reduction's mistake) do not."""
    layouts = ["tp2", "pp2", "pp2vpp2", "ep2", "dp2", "dp2+do+og", "ep2+do", "pp2vpp2+do+og", "pp2>tp2",
               "tp2>pp2vpp2", "tp2+do>pp2vpp2+do"]
    found = _layouts(engine_reference, layouts + ["ep2+flat"], nproc=2)
    for name in layouts:
        diff, moved = found[name]
        assert moved > 1e-2 and diff < 1e-6, (name, diff, moved)
    assert found["ep2+flat"][0] > 1e-3, found["ep2+flat"]


@pytest.mark.slow
def test_engine_on_four_processes_tp2_pp2_equals_one_process(engine_reference):
    """TP=2 x PP=2 (also interleaved, VPP=2) and TP=2 x EP=2, with and without the distributed optimizer, and a
    distributed-optimizer resume from TP=2 x PP=2 at PP=2 x VPP=2 x DP=2 on four processes (slow: four processes
    on the CI's two cores)."""
    layouts = ["tp2pp2", "tp2pp2+do", "tp2ep2", "tp2pp2vpp2+do", "tp2pp2+do>pp2vpp2+do"]
    found = _layouts(engine_reference, layouts, nproc=4)
    for name in layouts:
        diff, moved = found[name]
        assert moved > 1e-2 and diff < 1e-6, (name, diff, moved)


def test_resume_across_optimizer_layouts_gets_a_one_line_error(megatron, tmp_path):
    """A sharded checkpoint of the plain optimizer does not resume into the distributed one (its keys differ):
    a one-line error, not Megatron's KeyError; the same optimizer resumes, its Adam steps per parameter again."""
    from megatron.core import dist_checkpointing

    from nemo_upcycle.compat import megatron_engine_on_cpu
    from nemo_upcycle.errors import UpcycleError
    from nemo_upcycle.models.backends import MegatronBackend
    from nemo_upcycle.train.parallel import MegatronEngine, ParallelLayout

    def engine(distributed: bool) -> MegatronEngine:
        torch.manual_seed(0)
        e = MegatronEngine(MegatronBackend(small_config(), use_te=False),
                           ParallelLayout(use_distributed_optimizer=distributed))
        e.build_optimizer(dict(name="adamw", lr=0.01))
        return e

    tokens = torch.randint(0, 96, (2, 33), generator=torch.Generator().manual_seed(0))
    for distributed in (False, True):
        first = engine(distributed)
        first.run({"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}, 1, forward_only=False)
        first.optimizer.step()
        path = tmp_path / f"distributed_{distributed}"
        path.mkdir()
        with megatron_engine_on_cpu():
            dist_checkpointing.save(first.sharded_state_dict(), str(path))
        with pytest.raises(UpcycleError, match=f"use_distributed_optimizer={distributed} in 1 Megatron optimizer"):
            engine(not distributed).check_resumes_from(path)
        same = engine(distributed)
        same.check_resumes_from(path)
        with megatron_engine_on_cpu():
            same.load_optimizer_state(dist_checkpointing.load(same.sharded_state_dict(loading=True),
                                                              str(path))["optimizer"])
        states = list(same.optimizer.megatron.optimizer.state.values())
        assert [float(s["step"]) for s in states] == [1.0] * len(states)
        assert len({id(s["step"]) for s in states}) == len(states)  # torch's Adam increments each one


@pytest.mark.slow
def test_interleaved_engine_run_resumes_through_lightning(megatron, tmp_path):
    """Through the CLI (Lightning, exp_manager, validation, .nemo): two steps in one process with the distributed
    optimizer, then a torchrun launch at PP=2 x VPP=2 (four layers: one per chunk) resuming to step four, equal
    to an uninterrupted one-process run."""
    from nemo_upcycle.train.run import train
    from tests.integration.test_train import _engine_args, _saved, _torchrun_train, build_workdir, run_config

    work = build_workdir(tmp_path, num_layers=4)
    args = lambda name, steps: _engine_args(work, name, steps) + ["use_distributed_optimizer=true"]  # noqa: E731
    train(run_config(work, *args("vpp_resume", 2)))
    _torchrun_train(work, args("vpp_resume", 4) + ["pipeline_model_parallel_size=2",
                                                   "virtual_pipeline_model_parallel_size=2"])
    single = train(run_config(work, *args("one_engine", 4)))
    start, one, two = _saved(work / "moe.nemo"), _saved(single.nemo_path), _saved(work / "vpp_resume.nemo")
    assert one.keys() == two.keys() == start.keys()
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 0.01
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-6, msg=k)
