"""The NeMo model class and continued training on CPU: restore / train / save / restore, learning on real text,
load balancing by the aux loss, torch and Megatron backends agreeing, upcycling at restore time, resume."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from nemo_upcycle.checkpoint import load_tokenizer_of, open_checkpoint
from nemo_upcycle.convert import convert
from nemo_upcycle.data.preprocess import preprocess
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.train.nemo_model import MegatronUpcycledGPTModel
from nemo_upcycle.recipe import UpcycleConfig
from nemo_upcycle.train.run import build_model, load_config, train
from tests.conftest import random_model, small_config, torchrun
from tests.nemo_fixtures import pack_nemo, spm_model_bytes, write_nemo_dir

STDLIB = Path(sysconfig.get_paths()["stdlib"])
RECIPE = UpcycleConfig.from_shorthand("E4G2T2")


@pytest.fixture(scope="module")
def workdir(megatron, tmp_path_factory):
    return build_workdir(tmp_path_factory.mktemp("train"))


def build_workdir(tmp: Path, num_layers: int = 2) -> Path:
    """A dense .nemo with a SentencePiece tokenizer, its E4G2T2 upcycle, and real text tokenized for it."""
    dense = random_model(small_config(num_layers=num_layers, vocab_size=128, seq_length=64), scale=0.02)
    spm = spm_model_bytes(tmp, vocab_size=128)
    (tmp / "tokenizer.model").write_bytes(spm)
    src = pack_nemo(write_nemo_dir(tmp / "dense", dense, spm), tmp / "dense.nemo")
    convert(src, tmp / "moe.nemo", RECIPE, progress=False)
    with open_checkpoint(src) as reader:
        tokenizer = load_tokenizer_of(reader)
    files = sorted(STDLIB.glob("*.py"))[:60]  # real Python source: the first 60 stdlib modules, ~1.5 MB
    preprocess(files, tmp / "data" / "code", tokenizer, progress=False)
    return tmp


def run_config(workdir: Path, *overrides: str):
    return load_config([f"data.data_prefix=[{workdir / 'data' / 'code_text_document'}]",
                        f"exp_manager.exp_dir={workdir / 'exp'}", "trainer.enable_progress_bar=false",
                        "data.splits_string='90,10,0'",
                        "micro_batch_size=2", "global_batch_size=4", *overrides])


def weights(model: MegatronUpcycledGPTModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.backend.canonical_state_dict().items()}


def test_restore_train_save_restore(workdir):
    before = weights(MegatronUpcycledGPTModel.restore_from(str(workdir / "moe.nemo")))
    result = train(run_config(workdir, f"restore_from={workdir / 'moe.nemo'}", "name=roundtrip",
                              "trainer.max_steps=3", "trainer.val_check_interval=3"))
    trained = weights(result.model)
    assert result.steps == 3 and any(not torch.equal(before[k], trained[k]) for k in before)
    restored = MegatronUpcycledGPTModel.restore_from(str(result.nemo_path))
    assert restored.gpt_config == result.model.gpt_config
    assert all(torch.equal(trained[k], v) for k, v in weights(restored).items())
    assert restored.tokenizer.encode("def f(x): return x") == result.model.tokenizer.encode("def f(x): return x")
    # optimizer-free resume: the saved .nemo trains on
    again = train(run_config(workdir, f"restore_from={result.nemo_path}", "name=resume_from_nemo",
                             "trainer.max_steps=2", "trainer.val_check_interval=2"))
    assert again.steps == 2 and all(torch.isfinite(v).all() for v in weights(again.model).values())


def test_loss_goes_down_on_real_text(workdir):
    """A dense model trained from scratch (the `model` group) on Python source learns: the validation loss falls
    well below ln(128) = 4.85 nats, what an untrained model scores on a 128-token vocabulary."""
    result = train(run_config(workdir, "name=learn", "model.num_layers=2", "model.hidden_size=64",
                              "model.ffn_hidden_size=256", "model.num_attention_heads=4", "model.num_query_groups=2",
                              "model.encoder_seq_length=64", "model.tokenizer.library=sentencepiece",
                              f"+model.tokenizer.model={workdir / 'tokenizer.model'}", "optim.lr=3e-3",
                              "optim.sched.warmup_steps=2", "trainer.max_steps=60", "trainer.val_check_interval=40",
                              "trainer.limit_val_batches=2"))
    assert result.model.gpt_config.vocab_size == 128 and not result.model.gpt_config.is_moe
    assert result.metrics["lm_loss"] < 4.0 and result.metrics["val_loss"] < 4.2, result.metrics


def _max_expert_share(model: MegatronUpcycledGPTModel, tokens: torch.Tensor) -> float:
    """The largest fraction of layer 0's routed tokens any expert gets (uniform: 1/8; one expert of a top-2
    pair taking every token: 1/2)."""
    with torch.no_grad():
        counts = model(tokens).tokens_per_expert[0].float()
    return (counts.max() / counts.sum()).item()


def _mean_mlp_input(workdir: Path, tokens: torch.Tensor) -> torch.Tensor:
    """The average input of layer 0's MLP: a direction most tokens share, to bias a router with."""
    model = MegatronUpcycledGPTModel.from_dense(workdir / "dense.nemo", RECIPE, overrides={"backend": "torch"})
    seen = []
    model.backend.model.decoder.layers[0].mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(tokens)
    return seen[0].reshape(-1, seen[0].shape[-1]).mean(0)


@pytest.mark.parametrize("backend", ["torch", "megatron"])
def test_aux_loss_pulls_an_unbalanced_router_towards_balance(workdir, backend):
    """Experts 0 and 1 (one virtual group) start with most tokens; training with the load-balancing loss
    spreads them out, training without it does not."""
    tokens = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    mu = _mean_mlp_input(workdir, tokens)
    shares = {}
    for coeff in (0.0, 0.5):
        # the paper's random group rows, biased below: the calibrated default starts ordered (one group takes the
        # load) and balances more slowly (tests/equivalence/test_router_init.py::test_calibrated_router_learns_and_balances)
        model = MegatronUpcycledGPTModel.from_dense(workdir / "dense.nemo", RECIPE.replace(
            router="topk_then_softmax", router_init="virtual_group", aux_loss_coeff=coeff), overrides={"backend": backend})
        state = model.backend.canonical_state_dict()
        state["decoder.layers.0.mlp.router.weight"][:2] += 3.0 * mu / mu.norm() ** 2  # +3 on most tokens' logits
        model.load_canonical_state_dict(state)
        assert _max_expert_share(model, tokens) > 0.35
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(15):
            opt.zero_grad()
            step = model(tokens)
            loss = torch.nn.functional.cross_entropy(step.logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
            (loss + step.objective).backward()
            opt.step()
        shares[coeff] = _max_expert_share(model, tokens)
    assert shares[0.5] < 0.2 and shares[0.0] > 0.3, shares  # uniform is 0.125


def test_torch_and_megatron_backends_agree_on_loss_and_gradients(workdir):
    recipe = RECIPE.replace(router="softmax_then_topk", z_loss_coeff=1e-3)
    models = {b: MegatronUpcycledGPTModel.from_dense(workdir / "dense.nemo", recipe, overrides={"backend": b})
              for b in ("torch", "megatron")}
    batch = {"tokens": torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))}
    batch["labels"] = torch.roll(batch["tokens"], -1, dims=1)
    losses, grads = {}, {}
    for name, model in models.items():
        model.train()
        loss, step = model._step(batch)
        (loss + step.objective).backward()
        losses[name] = (loss.item(), step.aux_loss.item(), step.z_loss.item())
        prefix = "model."
        grads[name] = {k[len(prefix):]: p.grad for k, p in model.backend.named_parameters()}
    assert losses["torch"] == pytest.approx(losses["megatron"], rel=1e-5)
    assert losses["torch"][1] > 0 and losses["torch"][2] > 0
    assert grads["torch"].keys() == grads["megatron"].keys()
    for k, g in grads["torch"].items():
        torch.testing.assert_close(g, grads["megatron"][k], rtol=1e-4, atol=1e-6, msg=k)


class _GradCapture(pl.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads = {k: p.grad.clone() for k, p in pl_module.backend.named_parameters()}


def test_backends_agree_on_accumulated_gradients_in_lightning(workdir):
    """Two micro-batches per step: Lightning divides the returned loss by 2, and Megatron, which injects the
    router losses' gradient itself, must divide it too (aux coefficient large so a mistake shows)."""
    grads = {}
    for backend in ("torch", "megatron"):
        cfg = run_config(workdir, f"restore_from={workdir / 'dense.nemo'}", "+upcycle.shorthand=E4G2T2",
                         "+upcycle.aux_loss_coeff=0.5", "+upcycle.z_loss_coeff=0.01", f"backend={backend}",
                         "trainer.max_steps=1")
        capture = _GradCapture()
        trainer = pl.Trainer(max_steps=1, accumulate_grad_batches=2, callbacks=[capture], logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                             enable_model_summary=False)
        trainer.fit(build_model(cfg, trainer))
        grads[backend] = capture.grads
    router = "model.decoder.layers.0.mlp.router.weight"
    for k, g in grads["torch"].items():
        torch.testing.assert_close(g, grads["megatron"][k], rtol=1e-4, atol=1e-6, msg=k)
    assert grads["torch"][router].abs().max() > 1e-3


def test_from_dense_equals_convert_then_restore(workdir):
    a = weights(MegatronUpcycledGPTModel.from_dense(workdir / "dense.nemo", RECIPE))
    b = weights(MegatronUpcycledGPTModel.restore_from(str(workdir / "moe.nemo")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_resumes_from_exp_manager_checkpoints(workdir):
    args = [f"restore_from={workdir / 'moe.nemo'}", "name=resume", "trainer.val_check_interval=2"]
    first = train(run_config(workdir, *args, "trainer.max_steps=2"))
    second = train(run_config(workdir, *args, "trainer.max_steps=4"))
    assert first.steps == 2 and second.steps == 4  # the second run continued from step 2
    assert (first.exp_dir / "checkpoints").is_dir() and any(first.exp_dir.rglob("events.out.tfevents*"))
    assert (second.exp_dir / "expert_load.png").is_file()


# ---- Megatron-core's engine through Lightning: one process, and a resume under torchrun at another layout -------
ADAM = ["optim.name=adamw", "optim.eps=1e-3", "optim.weight_decay=0.1", "optim.lr=0.01", "optim.sched.warmup_steps=0",
        "optim.sched.min_lr=0.01"]  # Adam with an eps that keeps tiny gradient differences from being amplified


def _engine_args(workdir: Path, name: str, steps: int) -> list[str]:
    return [f"restore_from={workdir / 'moe.nemo'}", "backend=megatron", f"name={name}",
            f"save_nemo={workdir / name}.nemo", "micro_batch_size=1", "global_batch_size=4",
            f"trainer.max_steps={steps}", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", *ADAM]


def _torchrun_train(workdir: Path, args: list[str]) -> None:
    common = [f"data.data_prefix=[{workdir / 'data' / 'code_text_document'}]", f"exp_manager.exp_dir={workdir / 'exp'}",
              "trainer.enable_progress_bar=false", "data.splits_string='90,10,0'"]
    proc = torchrun(["-m", "nemo_upcycle.cli", "train", *common, *args])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("| steps ") == 1  # the summary comes from rank 0 only


def _saved(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as reader:
        return reader.state_dict()


def test_engine_run_resumes_at_another_layout_and_equals_the_uninterrupted_run(workdir):
    """Two steps in one process through Megatron's engine (its DDP, optimizer, schedule) leave a sharded model +
    Adam checkpoint; a torchrun launch at TP=2 resumes from it to step four (its sequence-parallel shards reduced by
    finalize_model_grads) and saves one .nemo equal to an uninterrupted one-process run of four steps."""
    from nemo_upcycle.train.parallel import MegatronParallelStrategy

    first = train(run_config(workdir, *_engine_args(workdir, "layout_resume", 2)))
    assert isinstance(first.model.trainer.strategy, MegatronParallelStrategy) and first.model.engine is not None
    assert type(first.model.engine.optimizer.megatron).__module__.startswith("megatron.core.optimizer")
    ckpt = next((first.exp_dir / "checkpoints").glob("*-last"))
    assert (ckpt / "metadata.json").is_file() and ckpt.with_name(ckpt.name + ".ckpt").is_file()
    _torchrun_train(workdir, _engine_args(workdir, "layout_resume", 4) + ["tensor_model_parallel_size=2"])
    single = train(run_config(workdir, *_engine_args(workdir, "one_engine", 4)))
    start, one, two = _saved(workdir / "moe.nemo"), _saved(single.nemo_path), _saved(workdir / "layout_resume.nemo")
    assert one.keys() == two.keys() == start.keys()
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 0.01  # training moved the weights
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-6, msg=k)


def test_parallel_sizes_get_one_line_errors(workdir):
    from nemo_upcycle.train.parallel import ParallelLayout

    with pytest.raises(UpcycleError, match="need 2 processes: launch with torchrun"):
        train(run_config(workdir, f"restore_from={workdir / 'moe.nemo'}", "backend=megatron",
                         "tensor_model_parallel_size=2"))
    with pytest.raises(UpcycleError, match="need backend=megatron"):
        ParallelLayout().check(2, "torch")
    with pytest.raises(UpcycleError, match="cannot be split into tensor_model_parallel_size 2"):
        ParallelLayout(tensor_model_parallel_size=2, expert_model_parallel_size=2).check(6, "megatron")
    with pytest.raises(UpcycleError, match="needs pipeline_model_parallel_size > 1"):
        ParallelLayout(virtual_pipeline_model_parallel_size=2).check(2, "megatron")
    interleaved = ParallelLayout(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    interleaved.check(4, "megatron", global_batch_size=8, micro_batch_size=2)
    with pytest.raises(UpcycleError, match=r"interleaved schedule\) needs the micro-batches .* \(3: "):
        interleaved.check(4, "megatron", global_batch_size=12, micro_batch_size=2)
    with pytest.raises(UpcycleError, match="overlap_param_gather needs use_distributed_optimizer"):
        ParallelLayout(overlap_param_gather=True).check(2, "megatron")


def test_expert_lr_mult_scales_the_experts_step_and_nothing_else(workdir):
    """One AdamW step (no decay) from the same start on the same batch: Adam's first step is lr * sign(grad) per
    element, so the experts' weight matrices move m times as far with expert_lr_mult=m, every other tensor the same."""
    start = weights(MegatronUpcycledGPTModel.restore_from(str(workdir / "moe.nemo")))
    moved = {}
    for mult in (1.0, 3.0):
        result = train(run_config(workdir, f"restore_from={workdir / 'moe.nemo'}", f"name=lr_mult_{mult}",
                                  "backend=torch", f"expert_lr_mult={mult}", "optim.weight_decay=0.0",
                                  "trainer.max_steps=1", "trainer.val_check_interval=1"))
        moved[mult] = {k: v - start[k] for k, v in weights(result.model).items()}
    experts = [k for k in start if ".experts." in k and start[k].ndim >= 2]
    assert experts and len(experts) < len(start)
    for k in start:
        want = 3.0 * moved[1.0][k] if k in experts else moved[1.0][k]
        assert torch.allclose(moved[3.0][k], want, rtol=1e-3, atol=1e-9), k
    assert all(moved[1.0][k].abs().max() > 0 for k in experts)
    # Through the whole cosine decay, not only at the peak: the experts end at min_lr x m, the rest at min_lr.
    decayed = train(run_config(workdir, f"restore_from={workdir / 'moe.nemo'}", "name=lr_mult_decay",
                               "backend=torch", "expert_lr_mult=3.0", "optim.lr=1e-3", "optim.sched.min_lr=1e-4",
                               "optim.sched.warmup_steps=1", "trainer.max_steps=4", "trainer.val_check_interval=4"))
    lrs = sorted(g["lr"] for g in decayed.model._optimizer.param_groups)
    assert lrs == pytest.approx([1e-4, 1e-4, 3e-4])
    with pytest.raises(UpcycleError, match="expert_lr_mult is applied by the torch backend only"):
        train(run_config(workdir, f"restore_from={workdir / 'moe.nemo'}", "name=lr_mult_engine", "backend=megatron",
                         "expert_lr_mult=2.0", "trainer.max_steps=1"))


def test_val_check_interval_counts_optimizer_steps_with_accumulation(workdir, monkeypatch):
    """micro 2, global 4: the torch backend accumulates 2 micro-batches per step, and validation every 2 steps
    of 4 runs twice (as on the engine and in NeMo), not every 2 micro-batches (4 times)."""
    validations = []
    original = MegatronUpcycledGPTModel.on_validation_epoch_end
    monkeypatch.setattr(MegatronUpcycledGPTModel, "on_validation_epoch_end",
                        lambda self: (validations.append(self.trainer.global_step), original(self))[1])
    train(run_config(workdir, f"restore_from={workdir / 'moe.nemo'}", "name=val_interval", "backend=torch",
                     "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1"))
    assert validations == [2, 4]


def test_sigterm_stops_training_at_the_end_of_a_step_with_one_line(workdir):
    """A scheduler's kill mid-run: training ends its step, the command exits 143 with one line naming the
    checkpoint it saved, and no .nemo of the unfinished model is written."""
    import signal
    import subprocess
    import sys
    import time

    overrides = [f"restore_from={workdir / 'moe.nemo'}", f"data.data_prefix=[{workdir / 'data' / 'code_text_document'}]",
                 f"exp_manager.exp_dir={workdir / 'exp'}", "name=sigterm", "data.splits_string='90,10,0'",
                 "micro_batch_size=2", "global_batch_size=4", "trainer.max_steps=100000", "trainer.val_check_interval=100000",
                 "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false"]
    proc = subprocess.Popen([sys.executable, "-m", "nemo_upcycle.cli", "train", *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, deadline = "", time.monotonic() + 180
    while "Total params" not in seen:  # Lightning's model summary: fit has begun
        line = proc.stdout.readline()
        assert line and time.monotonic() < deadline, seen[-3000:]
        seen += line
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, rest[-3000:]
    assert "Traceback" not in rest, rest[-3000:]
    [line] = [x for x in rest.splitlines() if x.startswith("terminated after step ")]
    assert line.endswith("-last.ckpt, and the same command resumes from it"), line
    assert Path(line.split("its checkpoint is ")[1].split(", and")[0]).is_file()
    assert not (workdir / "exp" / "sigterm" / "sigterm.nemo").exists()  # the trained model's .nemo


def test_sigterm_mid_accumulation_ends_the_step_and_resumes_exactly(workdir, monkeypatch):
    """micro_batch_size 2, global_batch_size 4: two micro-batches per optimizer step. SIGTERM during step 3's first
    micro-batch ends training after step 3, not halfway through it (Lightning's own handler stops there, with half
    a gradient and no checkpoint); the checkpoint holds step 3, and resuming it to step 5 gives the weights of an
    uninterrupted 5-step run."""
    import os
    import signal

    from nemo_upcycle.train.callbacks import ExpertLoadMonitor
    from nemo_upcycle.train.run import Preempted

    args = [f"restore_from={workdir / 'moe.nemo'}", "backend=torch", "trainer.val_check_interval=100",
            "trainer.limit_val_batches=1", "optim.sched.warmup_steps=1"]
    record = ExpertLoadMonitor.on_train_batch_end

    def record_then_kill_at_the_fifth_micro_batch(self, trainer, pl_module, outputs, batch, batch_idx):
        record(self, trainer, pl_module, outputs, batch, batch_idx)
        if batch_idx == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as patch:
        patch.setattr(ExpertLoadMonitor, "on_train_batch_end", record_then_kill_at_the_fifth_micro_batch)
        with pytest.raises(Preempted, match=r"^terminated after step 3 of 5: its checkpoint is .*-last\.ckpt") as stop:
            train(run_config(workdir, *args, "name=preempted", "trainer.max_steps=5"))
    assert stop.value.step == 3 and Path(stop.value.checkpoint).is_file()
    resumed = train(run_config(workdir, *args, "name=preempted", "trainer.max_steps=5"))
    straight = train(run_config(workdir, *args, "name=uninterrupted", "trainer.max_steps=5"))
    assert resumed.steps == straight.steps == 5
    a, b, start = weights(resumed.model), weights(straight.model), weights(build_model(run_config(workdir, *args)))
    assert max((b[k] - start[k]).abs().max().item() for k in b) > 1e-4  # five steps moved the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_tie_virtual_groups_keeps_whole_groups_while_the_router_learns(workdir):
    """E4G2T2 has 4 virtual groups of 2 experts sharing one router row. Tied, the rows of each group stay equal
    through training (so top-k keeps selecting whole groups) yet move; untied, Adam separates them at once."""
    granularity = RECIPE.granularity
    initial = MegatronUpcycledGPTModel.restore_from(str(workdir / "moe.nemo"))
    start = [router.weight.detach().clone() for router in initial._routers()]
    trained = {}
    for tie in (False, True):
        result = train(run_config(workdir, f"restore_from={workdir / 'moe.nemo'}", f"name=tie_{tie}", "backend=torch",
                                  f"tie_virtual_groups={str(tie).lower()}", "trainer.max_steps=3",
                                  "trainer.val_check_interval=3"))
        trained[tie] = result.model._routers()
    assert len(trained[True]) == len(start) > 0
    for router, before in zip(trained[True], start):
        assert router.groups_tied(granularity)
        assert (router.weight.detach() - before).abs().max() > 1e-4
    assert not any(router.groups_tied(granularity) for router in trained[False])


def test_tie_virtual_groups_refuses_models_it_cannot_tie(workdir, tmp_path):
    untied = tmp_path / "random_router.nemo"
    convert(workdir / "dense.nemo", untied, UpcycleConfig.from_shorthand("E4G2T2", router_init="random"),
            progress=False)
    for model, problem in ((workdir / "dense.nemo", "needs fine-grained experts .* no MoE layers"),
                           (untied, "the router rows of a virtual group differ")):
        with pytest.raises(UpcycleError, match=problem):
            train(run_config(workdir, f"restore_from={model}", "name=tie_refused", "backend=torch",
                             "tie_virtual_groups=true", "trainer.max_steps=1"))
    with pytest.raises(UpcycleError, match="tie_virtual_groups is applied by the torch backend only"):
        train(run_config(workdir, f"restore_from={workdir / 'moe.nemo'}", "name=tie_engine", "backend=megatron",
                         "tie_virtual_groups=true", "trainer.max_steps=1"))
